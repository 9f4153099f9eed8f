import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_codes, packed_words, unpack_codes
from lowbit.runtime.packed_linear import _unpack_fast


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [7, 33, 64, 576])
@pytest.mark.parametrize("packing", ["dense", "legacy"])
def test_pack_round_trips(bits, n, packing):
    codes = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(bits * n), dtype=torch.uint8)
    packed = pack_codes(codes, bits, packing)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_words(n, bits, packing))
    assert torch.equal(unpack_codes(packed, bits, n, packing), codes)
    if packing == "dense":
        assert torch.equal(_unpack_fast(packed, bits, n), codes)


def test_layouts_agree_for_widths_dividing_32_and_differ_for_3_bits():
    codes = torch.randint(0, 4, (2, 64), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 2, "dense"), pack_codes(codes, 2, "legacy"))
    assert packed_words(64, 3, "dense") == 6 and packed_words(64, 3, "legacy") == 7


def test_first_element_lands_in_the_lowest_bits():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert int(pack_codes(codes, 4)[0, 0]) == 0x87654321 - 2**32


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_compressed_tensors_pack_to_int32(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for n in (33, 576):
        codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_codes(codes, bits), helpers.pack_to_int32(signed, bits))
        assert torch.equal(pack_codes(codes.T.contiguous(), bits).T, helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_bad_input_is_a_lowbit_error():
    with pytest.raises(LowbitError, match="bit width"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(LowbitError, match="words per row"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 64)
