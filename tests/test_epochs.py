"""Epochs: a finite dataset repeated in seeded, per-epoch shuffled order."""

from mtrain.data.epochs import Epochs


def test_every_epoch_is_a_permutation_and_the_order_is_seeded():
    data = list(range(7))
    repeated = Epochs(data, num_samples=17, seed=3)
    values = [repeated[i] for i in range(len(repeated))]
    assert len(values) == 17
    assert sorted(values[:7]) == data and sorted(values[7:14]) == data
    assert values[:7] != values[7:14]  # each epoch has its own order
    assert values == [Epochs(data, 17, seed=3)[i] for i in range(17)]
    assert values != [Epochs(data, 17, seed=4)[i] for i in range(17)]
