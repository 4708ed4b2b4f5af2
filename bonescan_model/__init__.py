"""bonescan_model: the framework-free domain library (numpy, torch, pydicom, scikit-image).

Never imports ray: usable in a notebook or a hospital script.
"""
