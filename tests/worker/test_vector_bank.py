import numpy as np
import pytest
import torch

from icv_vllm.worker.vector_bank import BankFullError, VectorBank

DIGESTS = [f"d{i}" for i in range(8)]


def bank_with(n_slots: int, n_contents: int, growable: bool = False) -> VectorBank:
    bank = VectorBank(n_slots, 3, 8, torch.device("cpu"), growable=growable)
    bank.add_contents({DIGESTS[i]: torch.full((3, 8), float(i + 1)) for i in range(n_contents)})
    return bank


def slots(bank: VectorBank, ids) -> list[int]:
    ids = np.array(ids, dtype=np.int64)
    return bank.slots_for(ids, DIGESTS)[ids].tolist()


def test_loads_shipped_contents_and_reuses_slots():
    bank = bank_with(2, 4)
    address = bank.tensor.data_ptr()
    s = slots(bank, [0, 1])
    assert sorted(s) == [0, 1]
    assert bank.tensor[s[1], 2].tolist() == [2.0] * 8
    assert slots(bank, [1]) == [s[1]]
    assert bank.tensor.data_ptr() == address


def test_no_vector_maps_to_minus_one():
    bank = bank_with(2, 2)
    table = bank.slots_for(np.array([0, 1]), DIGESTS)
    assert table[np.array([[0, -1], [1, -1]])].tolist() == [[table[0], -1], [table[1], -1]]


def test_lru_evicts_least_recently_used_not_needed_now():
    bank = bank_with(2, 4)
    s0, s1 = slots(bank, [0]) + slots(bank, [1])
    slots(bank, [0])  # 0 most recent
    (s2,) = slots(bank, [2])
    assert s2 == s1 and bank.loaded() == [0, 2]
    assert bank.tensor[s2, 0].tolist() == [3.0] * 8


def test_fixed_bank_refuses_a_step_that_does_not_fit():
    bank = bank_with(2, 3)
    with pytest.raises(BankFullError, match="more than 2 distinct vectors"):
        slots(bank, [0, 1, 2])


def test_growable_bank_doubles_and_keeps_contents():
    bank = bank_with(2, 3, growable=True)
    s = slots(bank, [0, 1, 2])
    assert bank.capacity == 4 and len(set(s)) == 3
    for i, slot in enumerate(s):
        assert bank.tensor[slot, 1].tolist() == [float(i + 1)] * 8


def test_unshipped_content_is_an_error_never_unsteered():
    bank = bank_with(2, 0)
    with pytest.raises(RuntimeError, match="never shipped"):
        slots(bank, [0])


def test_released_ids_free_their_slot():
    bank = bank_with(1, 2)
    slots(bank, [0])
    bank.release([0])
    bank.drop_contents(["d0"])
    assert bank.loaded() == [] and "d0" not in bank.contents
    assert slots(bank, [1]) == [0]


def test_wrong_shape_is_refused():
    bank = VectorBank(1, 3, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        bank.add_contents({"x": torch.zeros(2, 8)})
