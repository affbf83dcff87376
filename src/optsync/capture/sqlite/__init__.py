"""SQLite capture: triggers fill a change table that the log reader follows (the demo source).

One module per concern, alike across sources: ``source`` (the ``ChangeSource``), ``connection``,
``preflight``, ``snapshot``, ``log``, ``values``, ``position``. Nothing is imported here, so
importing one module does not load every driver."""
