"""Engines that drive the server loop: Ray simulation, the batched one-process engine, deployment."""
