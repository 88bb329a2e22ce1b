"""Training on several machines over MLX's ring backend (mx.distributed, TCP).

hostfile.py  the launch hostfile and the ring layout        secret.py  the shared secret, HMAC proofs
link.py      authenticated control link, peer liveness      agreement.py  settings every rank must share
cluster.py   joining the run; the training-time guards      sync.py    rank 0's state to everyone
split.py     per-rank shares, fixed or measured (auto)      watchdog.py  a frozen peer stops the run
launcher.py  starting every rank (locally or over ssh)
See docs/distributed.md.
"""
from .cluster import Cluster, join_cluster

__all__ = ["Cluster", "join_cluster"]
