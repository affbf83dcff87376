"""MySQL and MariaDB capture: binlog reading after a consistent snapshot (docs/mysql.md).

One module per concern, alike across sources: ``source`` (the ``ChangeSource``), ``connection``,
``preflight``, ``snapshot``, ``log``, ``values``, ``position``. Nothing is imported here, so
importing one module does not load every driver."""
