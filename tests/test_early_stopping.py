from reid.train.early_stopping import EarlyStopping


def test_stops_after_patience_and_state_round_trips():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0.5, 0) and not stopper.should_stop
    assert not stopper.update(0.4, 1) and not stopper.should_stop
    restored = EarlyStopping(patience=99)
    restored.load_state_dict(stopper.state_dict())
    assert not restored.update(0.5, 2)  # equal is not better
    assert restored.should_stop and restored.best_epoch == 0 and restored.best_score == 0.5


def test_zero_patience_never_stops():
    stopper = EarlyStopping(patience=0)
    for epoch in range(5):
        stopper.update(0.1, epoch)
    assert not stopper.should_stop
