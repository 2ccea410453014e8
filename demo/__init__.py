"""`python -m demo` (`make demo`): the whole product on one machine, offline, in minutes.

The demo is a client of the system: it starts the services the way `dreambooth-server up` does
and then talks to them only through the SDK, like any user.

1. Imports the tiny Stable Diffusion as base model "tiny-sd" into a local-directory store
   (`out/demo-store/`, wiped at the start unless --keep-store).
2. Draws a handful of deterministic photos of the subject (a red ball on varying backgrounds).
3. Starts the three services with `up`'s launcher (services/launcher/) as subprocesses on free
   127.0.0.1 ports, with Ray offline, and waits until their health checks say SERVING.
4. Through the SDK: uploads the photos, creates a DreamBooth job with prior preservation at
   64x64, prints its events while it trains, then samples "a photo of sks ball on the moon"
   from the fine-tuned model (and, to compare, from the base).
5. Writes everything under `out/demo/` (subject photos, validation previews, generated PNGs,
   service logs), prints a summary, and stops the services it started (only those).

Modules: subject.py (the photos), services.py (starting the services), journey.py (the SDK
calls and the summary), main.py (options and the run).
"""
