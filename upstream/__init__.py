"""Every change megaseek makes to upstream code (megatron-core 0.19.2, Python's stdlib),
in one place below `plugins/` and `integration/` (both import from here; nothing here
imports them).

- `patching`: the `Fix` record (upstream file:line, reason, its `Scope`, a `still_needed`
  probe) and the `Patcher` that applies and undoes attribute changes;
- `registry`: `all_fixes()`, every fix of the project (`megaseek fixes` prints them);
- `compat`: fixes every machine needs; `cpu`, `cpu_device`: fixes for running without CUDA;
- `transformer`, `optimizer`: fixes that plugins need for a run (fp8, mla, bf16_moments),
  returned by their `fixes` hooks;
- `seams`: the places where plugins attach to Megatron's training loop, one module each;
- `megatron_modules`: Megatron's modules as the fixes and seams import them (when applied
  or probed);
- `private_names`: Megatron's private names that plugin modules override or call, with
  the probes those modules run.

Importing this package changes nothing; each fix is applied by whoever needs it, and only
when its scope holds.
"""
