"""The stream (Kinesis' role): a durable, ordered, replayable log of change events."""
