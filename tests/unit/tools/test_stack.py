"""The local stack's defaults (tools/stack.py)."""

from __future__ import annotations


def test_make_up_runs_internal_mtls_unless_told_otherwise():
    from tools.stack import arguments, local_stack

    assert local_stack(arguments(["up"])).internal_tls
    assert not local_stack(arguments(["up", "--plaintext-internal"])).internal_tls
