"""The server side of a run, over any Flower grid: the round loop (:mod:`.loop`), messages to the nodes
(:mod:`.transport`), the server's evaluation (:mod:`.evaluation`), the metrics row (:mod:`.rows`),
checkpoints (:mod:`.checkpoint`), the final model (:mod:`.export`) and the runs without clients
(:mod:`.baselines`)."""
