"""Change capture (DMS' role): an initial snapshot, then the source's log, as change events."""
