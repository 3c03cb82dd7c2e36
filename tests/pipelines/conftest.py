"""pytest reads the asserts of the shared helper module as it does the tests', so a failed check in a helper
shows the values that made it fail."""

import pytest

pytest.register_assert_rewrite("_tiny")
