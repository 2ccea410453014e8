"""`python -m demo` (`make demo`): the whole product on one machine, offline, in minutes.

The demo is a client of the system: it starts the services the way `dreambooth-server up` does
and then talks to them only through the SDK, like any user.

1. Imports the committed toy-world base (models/toy-world-base: Stable Diffusion's architecture,
   pretrained by the project on the world it draws) as "toy-world" into a local-directory store
   (`out/demo-store/`, wiped at the start unless --keep-store).
2. Writes the photos of a held-out subject (a red ball with a white stripe, never seen in
   pretraining) on different backgrounds, as a user would upload them.
3. Starts the three services with `up`'s launcher (services/launcher/) as subprocesses on free
   127.0.0.1 ports, with Ray offline, and waits until their health checks say SERVING.
4. Through the SDK: uploads the photos, samples the base model's "a photo of a ball", trains a
   DreamBooth job with prior preservation (ToyBench's recipe) at 64x64, printing its events,
   then samples "a photo of sks ball" on the beach, in the snow, at night and in the studio,
   and "a photo of a ball" again (prior preservation: still any ball).
5. Writes everything under `out/demo/` (subject photos, previews, generated PNGs, one
   contact-sheet.png of all of it, service logs), prints the subject and prompt fidelity
   ToyBench's evaluation net measured, and stops the services it started (only those).

Modules: subject.py (the photos), services.py (starting the services), journey.py (the SDK
calls and the summary), contact_sheet.py, measure.py, main.py (options and the run).
"""
