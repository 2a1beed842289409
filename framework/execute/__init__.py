"""Running calls: loading a version and calling it where its options say.

`loading` (the one place a pickle is loaded), `versions` (refs resolved, loaded
versions kept), `runner` (where a call runs), `calls` (the work and its answer),
`threads`, `isolation` + `process` + `worker` (worker processes), `batching`, `environments`.
"""
