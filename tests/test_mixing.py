import torch

from reid.data.mixing import context_swap


def _batch():
    # image i is filled with the value i, so where each pixel came from can be read back
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 32, 32).clone()
    return images, torch.tensor([0, 0, 1, 1, 2, 2])


def test_context_swap_keeps_the_centre_and_takes_the_border_from_another_individual():
    images, labels = _batch()
    out = context_swap(images, labels, p=1.0, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        centre, corner = out[i, 0, 16, 16].item(), out[i, 0, 0, 0].item()
        assert centre == i
        donor = int(corner)
        assert corner == donor and labels[donor] != labels[i]


def test_context_swap_is_a_function_of_its_generator_and_off_at_p_zero():
    images, labels = _batch()
    first = context_swap(images, labels, 0.5, torch.Generator().manual_seed(3))
    again = context_swap(images, labels, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(context_swap(images, labels, 0.0, torch.Generator()), images)


def test_context_swap_leaves_a_batch_of_one_individual_alone():
    images, _ = _batch()
    same = torch.zeros(6, dtype=torch.long)
    assert torch.equal(context_swap(images, same, 1.0, torch.Generator().manual_seed(0)), images)
