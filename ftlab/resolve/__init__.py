"""Overrides -> composed config -> typed ``RunConfig`` -> validated, with ``Derived`` values."""
