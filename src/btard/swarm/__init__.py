"""btard.swarm: BTARD-SGD for real, one process per peer over libp2p.

- :mod:`btard.swarm.driver`: `ProtocolDriver` runs a sans-IO `BtardPeer` over a `Transport` on an asyncio
  loop (receive at once, tick at deadlines, per-destination FIFO send queues).
- :mod:`btard.swarm.peer`: `SwarmPeer` / `PeerRunConfig`: one training peer (bootstrap through a signed
  genesis, gradients in a worker thread, optimizer, metrics, audit log, checkpoints, state for late joiners).
- :mod:`btard.swarm.control`: the swarm's own messages (HELLO, GENESIS, PING, STATE_REQUEST, STATE).
- :mod:`btard.swarm.checkpoint`: checkpoints without pickle (``.npy`` + JSON), identical across honest peers.
- :mod:`btard.swarm.launcher`: `LocalSwarm`, a swarm of `btard peer` processes on loopback, and its report.
- :mod:`btard.swarm.cli`: ``btard peer``, ``btard swarm``, ``btard demo``.

Nothing here is imported by ``import btard``; the transport (hivemind) loads only when a peer runs.
"""
