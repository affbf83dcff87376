"""PostgreSQL capture: logical replication (pgoutput) after an exported snapshot (docs/postgres.md).

One module per concern, alike across sources: ``source`` (the ``ChangeSource``), ``connection``,
``preflight``, ``snapshot``, ``log``, ``values``, ``position``. Nothing is imported here, so
importing one module does not load every driver."""
