"""python -m services.edge [--out FILE]: print or write the Envoy config rendered from EdgeSettings."""

from __future__ import annotations

import argparse
import pathlib

import yaml

from services.edge.render import render, write_sds
from services.edge.settings import EdgeSettings

parser = argparse.ArgumentParser(prog="python -m services.edge", description=__doc__)
parser.add_argument("--out", type=pathlib.Path)
parser.add_argument("--sds-out", type=pathlib.Path, help="the directory to write the SDS files to (tls_sds_dir)")
args = parser.parse_args()
HEADER = ("# Rendered by `python -m services.edge` from services/edge/settings.py (defaults, then the YAML file named\n"
          "# by MESH_EDGE_CONFIG_FILE, then MESH_EDGE_* variables). Do not edit: render it again. `make up` and the\n"
          "# tests render their own from the same settings, with the ports and certificates of the stack they start.\n")
settings = EdgeSettings()
text = HEADER + yaml.safe_dump(render(settings), sort_keys=False)
if args.sds_out:
    write_sds(settings, args.sds_out, HEADER)
if args.out:
    args.out.write_text(text)
else:
    print(text, end="")
