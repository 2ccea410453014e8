"""`dreambooth-server up`: the three services in one command, on one machine.

plan.py        each service's address and environment (data dir, ports, local store, local Ray)
children.py    one service as a child process: own session, output pumped line by line
health.py      gRPC health checks until every service says SERVING
supervisor.py  start, watch and stop a set of services together
base_model.py  the tiny base model, imported into an empty store on first start
up.py          the command: options, one prefixed log stream, signals, exit status

The demo (`python -m demo`) starts its services with the same plan and supervisor.
"""
