"""The engine (Amazon Pinpoint's role): apps, channels, endpoints, segments, consent history."""
