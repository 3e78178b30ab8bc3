"""Pinned rule maps: where they may live, and refusing maps of another shape."""

import pytest

from xdpml.datapath.pins import check_pins, prepare_pin_dir
from xdpml.errors import AttachError

pytestmark = pytest.mark.root


def test_pin_dir_must_be_on_a_bpf_filesystem(tmp_path):
    with pytest.raises(AttachError, match="is not a BPF filesystem"):
        prepare_pin_dir(str(tmp_path / "rules"), map_rules=16384, map_allow=1024)
    with pytest.raises(AttachError, match="absolute path"):
        prepare_pin_dir("relative/rules", map_rules=16384, map_allow=1024)


def test_pins_of_another_shape_are_refused_with_what_to_do(enf_dp):
    check_pins(enf_dp.pin_dir, map_rules=16384, map_allow=1024)  # the shape it was made with
    with pytest.raises(AttachError, match=r"enf_rules has key/value/entries .*xdpml rules unpin"):
        check_pins(enf_dp.pin_dir, map_rules=4096, map_allow=1024)
