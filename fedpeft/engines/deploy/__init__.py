"""Flower's deployment engine: the same apps as in simulation, on a SuperLink and real SuperNodes.

The ClientApp is ``fedpeft.clients.app:app`` in both engines; the ServerApp (:mod:`.serverapp`)
runs the same :func:`fedpeft.server.loop.run_federated` as the simulation's. :mod:`.submit` sends a
run to a SuperLink and follows it, :mod:`.security` makes the TLS certificates and node keys,
:mod:`.nodes` checks a SuperNode's node config (and exports demo partitions for nodes), and
:mod:`.federation` runs a SuperLink and SuperNodes on one machine. The command line for the
security set-up and the nodes is ``python -m fedpeft.deploy``.
"""
