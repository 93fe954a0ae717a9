"""PackedTensors: one stream's state tensors in one flat buffer, read by name like a dict."""

from __future__ import annotations

import pytest
import torch

from adapters.base import StateMeta, StreamState
from adapters.packed import Layout, PackedTensors, interned, packable, same_layout, stack_packed, unstack_packed
from adapters.segments import stacked, unstacked
from adapters.serialize import state_from_bytes, state_to_bytes


def stacked_example(count: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.means": torch.randn(count, 4, 2, generator=gen),
        "a.vars": torch.rand(count, 4, 2, generator=gen),
        "b.scale": torch.randn(count, 5, generator=gen),
        "c.scalar": torch.randn(count, generator=gen),
    }


def test_unstack_gives_each_stream_its_rows_by_name() -> None:
    tensors = stacked_example()
    rows = unstack_packed(tensors, 3)
    assert len(rows) == 3
    for i, packed in enumerate(rows):
        assert list(packed) == list(tensors) and len(packed) == 4
        for key, value in tensors.items():
            assert packed[key].shape == value.shape[1:]
            assert torch.equal(packed[key], value[i])
        assert "a.means" in packed and "missing" not in packed
        assert dict(packed).keys() == tensors.keys()


def test_streams_own_their_buffers() -> None:
    """A stream's row is a copy: the batch's buffer is not kept alive through it, rows never alias."""
    tensors = stacked_example()
    rows = unstack_packed(tensors, 3)
    pointers = {row.flat.untyped_storage().data_ptr() for row in rows}
    assert len(pointers) == 3
    assert all(row.flat.untyped_storage().nbytes() == row.nbytes() for row in rows)
    tensors["a.means"].zero_()
    assert rows[0]["a.means"].abs().sum() > 0


def test_stack_round_trip_is_exact_and_fresh() -> None:
    tensors = stacked_example()
    rows = unstack_packed(tensors, 3)
    layout = same_layout(rows)
    assert layout is not None
    again = stack_packed(rows, layout)
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(again[key], value)
    again["b.scale"].add_(1.0)  # the stacked copy may be updated in place (layers do)
    assert torch.equal(rows[1]["b.scale"], tensors["b.scale"][1])


def test_stacked_takes_packed_and_plain_states_alike() -> None:
    tensors = stacked_example()
    rows = unstack_packed(tensors, 3)
    plain = [{k: v.clone() for k, v in row.items()} for row in rows]
    mixed = [rows[0], plain[1], rows[2]]
    assert same_layout(mixed) is None
    for states in (rows, plain, mixed):
        out = stacked(states)
        for key, value in tensors.items():
            assert torch.equal(out[key], value)


def test_layouts_are_shared_between_streams() -> None:
    a = unstack_packed(stacked_example(), 3)
    b = unstack_packed(stacked_example(2), 2)
    assert a[0].layout is b[1].layout
    assert same_layout([*a, *b]) is a[0].layout
    assert interned(Layout(("x",), ((2,),), torch.float32)) is interned(Layout(("x",), ((2,),), torch.float32))


def test_tensors_of_another_dtype_stay_loose_beside_the_buffer() -> None:
    tensors = {"w": torch.randn(2, 3), "step": torch.tensor([4, 7]), "b": torch.randn(2)}
    assert packable(tensors) and not packable({})
    rows = unstacked(tensors, 2)
    packed = [row for row in rows if isinstance(row, PackedTensors)]
    assert len(packed) == 2
    assert list(rows[1]) == ["w", "b", "step"] and "step" in rows[1]
    assert torch.equal(rows[1]["w"], tensors["w"][1]) and rows[1]["step"].dtype == torch.int64
    assert int(rows[1]["step"]) == 7 and packed[1].nbytes() == 4 * 4 + 8
    again = stacked(rows)
    assert torch.equal(again["step"], tensors["step"]) and torch.equal(again["b"], tensors["b"])


def test_a_buffer_that_does_not_fit_its_layout_is_refused() -> None:
    layout = interned(Layout(("x", "y"), ((2,), (3,)), torch.float32))
    with pytest.raises(ValueError, match="does not hold layout"):
        PackedTensors(torch.zeros(4), layout)
    with pytest.raises(ValueError, match="does not hold layout"):
        PackedTensors(torch.zeros(5, dtype=torch.float64), layout)
    with pytest.raises(ValueError, match="loose tensors"):
        PackedTensors(torch.zeros(5), layout, {"step": torch.tensor(1)})


def test_packed_state_bytes_and_serialization() -> None:
    tensors = stacked_example()
    packed = unstack_packed(tensors, 3)[2]
    meta = StateMeta("unmix_tns", {}, "hash", 0, 1, 0)
    state = StreamState(packed, meta)
    assert state.nbytes() == sum(v[2].numel() * 4 for v in tensors.values())
    loaded = state_from_bytes(state_to_bytes(state))
    assert loaded.meta == meta
    for key, value in tensors.items():
        assert torch.equal(loaded.tensors[key], value[2])


def test_to_device_keeps_the_state_packed() -> None:
    packed = unstack_packed(stacked_example(), 3)[0]
    assert packed.to(torch.device("cpu")) is packed
