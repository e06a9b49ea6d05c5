"""Small filters that run as they are: ``twistd -n milter --config examples/milter.toml``."""
