"""ckpt-server: the node-local daemon that persists checkpoints handed over by trainers."""
