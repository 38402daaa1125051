"""One experiment running: its processes (metaserver, aggregator, trainers, and the launcher that owns
them), the exchange of weights between them, progress inside a round, and where a run starts or
continues from. Uses core and tracking."""
