"""Packing integer codes into bytes: exact round trips for every width, odd shapes, and errors."""

import pytest
import torch

from mrem_dist.artifact import code_range, pack_codes, packed_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (5, 13), (2, 3, 5), (384, 1536)])
def test_round_trip_is_exact(bits, signed, shape):
    lo, hi = code_range(bits, signed)
    g = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32)
    codes.view(-1)[0] = lo  # both ends of the range are present
    codes.view(-1)[-1] = hi
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(codes.numel(), bits)
    out = unpack_codes(packed, bits, signed, shape)
    assert out.shape == codes.shape and torch.equal(out.to(torch.int32), codes)


def test_sizes_are_what_the_widths_promise():
    assert packed_bytes(1000, 8) == 1000
    assert packed_bytes(1000, 4) == packed_bytes(1000, 3) == 500
    assert packed_bytes(1001, 4) == 501
    assert packed_bytes(1000, 2) == 250 and packed_bytes(1003, 2) == 251


def test_layout_low_bits_first():
    # Two signed 4-bit codes -8 and 7 are the fields 0 and 15: byte 0b1111_0000.
    assert pack_codes(torch.tensor([-8, 7]), 4, True).tolist() == [0xF0]
    # Four unsigned 2-bit codes 1, 2, 3, 0: 0b00_11_10_01.
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2, False).tolist() == [0b00111001]


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"codes span \[-3, 1\], outside the 2-bit signed range \[-2, 1\]"):
        pack_codes(torch.tensor([-3, 1]), 2, True)
    with pytest.raises(TypeError, match="integer codes"):
        pack_codes(torch.tensor([0.5]), 4, True)


def test_truncated_data_is_refused():
    packed = pack_codes(torch.zeros(10, dtype=torch.int32), 4, True)
    with pytest.raises(ValueError, match="5 packed bytes do not hold 12 codes of 4 bits"):
        unpack_codes(packed, 4, True, (3, 4))
