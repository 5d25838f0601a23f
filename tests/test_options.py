"""Options are frozen and keyword-only, modes accept their plain strings, and the Manager
never changes the option objects a caller passed it."""

import dataclasses
import json

import pytest

import ckpt
from ckpt.options import BestMode, LoadOptions, OnBusy, RetentionPolicy, SaveOptions


@pytest.mark.parametrize("cls", [SaveOptions, LoadOptions, RetentionPolicy])
def test_options_are_frozen_and_keyword_only(cls):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().daemon = "elsewhere"  # any field: a frozen instance refuses every assignment
    with pytest.raises(TypeError):
        cls(1)


def test_modes_accept_plain_strings_and_print_as_them():
    opts = SaveOptions(on_busy="refuse")
    assert opts.on_busy is OnBusy.REFUSE and opts == SaveOptions(on_busy=OnBusy.REFUSE)
    policy = RetentionPolicy(keep_best=1, best_metric="loss", best_mode="max")
    assert policy.best_mode is BestMode.MAX
    assert (str(OnBusy.WAIT), f"{BestMode.MIN}", json.dumps(BestMode.MAX)) == ("wait", "min", '"max"')


def test_a_bad_mode_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"on_busy must be 'wait' or 'refuse', not 'later'"):
        SaveOptions(on_busy="later")
    with pytest.raises(ValueError, match=r"best_mode must be 'min' or 'max', not 'best'"):
        RetentionPolicy(best_mode="best")


def test_manager_shares_its_storage_options_without_changing_the_callers(tmp_path):
    save_opts, load_opts = SaveOptions(chunk_bytes=1 << 20), LoadOptions(io_threads=2)
    creds = {"auto_mkdir": True}
    mgr = ckpt.Manager(
        str(tmp_path), storage_options=creds, save_options=save_opts, load_options=load_opts, handle_sigterm=False
    )
    try:
        assert save_opts.storage_options == {} and load_opts.storage_options == {}
        assert mgr.save_options == dataclasses.replace(save_opts, storage_options=creds)
        assert mgr.load_options == dataclasses.replace(load_opts, storage_options=creds)
    finally:
        mgr.close()
