"""The pipeline's tooling around `pipeline.py`: target settings, the parameters derived from the stages' settings,
the command line, the local run, the cost estimate, submission and the GitOps manifests.

Nothing in `components/` imports from here; the pipeline definition (`pipeline.py`) uses `targets` and
`parameters`, and the command line (`cli`) uses the pipeline.
"""
