import pytest
import torch

from icv_vllm.worker.vector_bank import BankFullError, VectorBank


def contents(n: int) -> dict:
    return {f"d{i}": torch.full((3, 8), float(i + 1)) for i in range(n)}


def test_loads_shipped_contents_and_reuses_slots():
    bank = VectorBank(2, 3, 8, torch.device("cpu"))
    bank.add_contents(contents(4))
    address = bank.tensor.data_ptr()
    slots = [bank.slot_of("d0", set()), bank.slot_of("d1", set())]
    assert sorted(slots) == [0, 1]
    assert bank.tensor[slots[1], 2].tolist() == [2.0] * 8
    assert bank.slot_of("d1", set()) == slots[1]
    assert bank.tensor.data_ptr() == address


def test_lru_evicts_oldest_unpinned():
    bank = VectorBank(2, 3, 8, torch.device("cpu"))
    bank.add_contents(contents(4))
    s0, s1 = bank.slot_of("d0", set()), bank.slot_of("d1", set())
    bank.slot_of("d0", set())  # d0 most recent
    s2 = bank.slot_of("d2", set())
    assert s2 == s1 and bank.loaded() == ["d0", "d2"]
    assert bank.tensor[s2, 0].tolist() == [3.0] * 8


def test_fixed_bank_refuses_a_step_that_does_not_fit():
    bank = VectorBank(2, 3, 8, torch.device("cpu"))
    bank.add_contents(contents(3))
    pinned: set[int] = set()
    bank.slot_of("d0", pinned), bank.slot_of("d1", pinned)
    with pytest.raises(BankFullError, match="more than 2 distinct vectors"):
        bank.slot_of("d2", pinned)


def test_growable_bank_doubles_and_keeps_contents():
    bank = VectorBank(2, 3, 8, torch.device("cpu"), growable=True)
    bank.add_contents(contents(3))
    pinned: set[int] = set()
    slots = [bank.slot_of(f"d{i}", pinned) for i in range(3)]
    assert bank.capacity == 4 and len(set(slots)) == 3
    for i, s in enumerate(slots):
        assert bank.tensor[s, 1].tolist() == [float(i + 1)] * 8


def test_unshipped_content_is_an_error_never_unsteered():
    bank = VectorBank(2, 3, 8, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="never shipped"):
        bank.slot_of("nope", set())


def test_dropped_contents_free_their_slot():
    bank = VectorBank(1, 3, 8, torch.device("cpu"))
    bank.add_contents(contents(2))
    bank.slot_of("d0", set())
    bank.drop_contents(["d0"])
    assert bank.loaded() == [] and "d0" not in bank.contents
    pinned = {99}
    assert bank.slot_of("d1", pinned) == 0


def test_wrong_shape_is_refused():
    bank = VectorBank(1, 3, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        bank.add_contents({"x": torch.zeros(2, 8)})
