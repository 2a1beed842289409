"""The build side: from a decorated function to a published version.

`registry` (`@deployment`), `project` (what travels by value, what is required),
`packing` (the artifact and its manifest), `publish` (`framework deploy`),
`releases` (pins, promote, rollback).
"""
