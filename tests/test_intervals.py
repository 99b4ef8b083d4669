import pytest


def test_rsr_interval_is_wilsons():
    from editguard.mask.evaluate import rsr_interval
    from editguard.intervals import interval_text, wilson_interval

    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # the textbook 0-of-10 case
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    lo, hi = wilson_interval(130, 200)
    assert (lo, hi) == pytest.approx((0.5816, 0.7127), abs=1e-4) and wilson_interval(0, 0) is None
    # a report written before intervals were recorded gets one from its RSR and n
    assert rsr_interval({"rsr": 0.65, "n": 200}) == pytest.approx([lo, hi])
    assert interval_text(rsr_interval({"rsr": 0.65, "n": 200})) == " (95 % CI 58.2-71.3 %)"
    assert interval_text(rsr_interval({"rsr": float("nan"), "n": 0})) == ""
