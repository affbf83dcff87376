"""Wire formats of change events: AWS DMS -> Kinesis JSON, and the Debezium envelope."""
