"""A CPU stand-in for an sglang diffusion worker (`python -m dsrouter.simworker`).

It speaks the HTTP contract of `sglang serve` 0.5.23 as written down in WORKER_API.md, with
real image/video/msgpack bytes and a service time proportional to the work asked for, so the
router's tests, its benchmark and `dsrouter run --demo` exercise the same code paths a GPU
pool does. Extra routes under `/_sim/` expose its state and inject faults.

`tests/simworker/test_contract.py` runs the same tests against this simulator and against
the real `sglang serve` (CPU, test plugin of `sglang/`), so a behaviour here that the real
server does not share fails there; `FAIL_MARKER` in a prompt fails a generation on both.
"""
