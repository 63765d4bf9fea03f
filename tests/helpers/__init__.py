"""The tests' shared harness: the backend choice (backend.py), multi-rank runs (multirank.py,
forked_command.py, training_runs.py), builders and oracles (mla_build.py, mla_oracle.py,
moe_build.py, plugin_args.py), host-sync counting (host_syncs.py) and paths (paths.py)."""
