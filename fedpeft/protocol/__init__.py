"""The wire: the typed plan a client follows, its encoding into Flower records, and every key string."""
