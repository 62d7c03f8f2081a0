"""Tests of the single-device model package."""
