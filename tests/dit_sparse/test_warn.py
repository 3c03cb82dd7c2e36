"""`WarnOnce`: each distinct message warns once, with the owner's prefix, pointing where `stacklevel` says."""

import warnings

from dit_sparse.warn import WarnOnce


def test_each_message_warns_once_per_owner_and_points_at_the_helpers_caller():
    warn = WarnOnce("dit-sparse test: ", stacklevel=3)

    def helper(message):  # plays the method that calls `_warn_once`: stacklevel 3 is its caller
        warn(message)

    def caller(message):
        helper(message)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            caller("first")
        caller("second")
        WarnOnce("dit-sparse test: ")("first")  # another owner keeps its own record
    assert [str(w.message) for w in seen] == ["dit-sparse test: first", "dit-sparse test: second",
                                              "dit-sparse test: first"]
    assert all(w.category is UserWarning for w in seen)
    assert seen[0].filename == __file__ and seen[0].lineno == caller.__code__.co_firstlineno + 1
