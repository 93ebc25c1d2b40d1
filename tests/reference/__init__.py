"""Reference outputs computed by torch and torchvision, committed so that the tests run without torch.

``cases.py`` makes every input (arrays, model weights, images) with NumPy and Pillow alone, so the
torch-free tests (``tests/test_reference.py``) and the script that computes the outputs
(``make_reference.py``, needs torch) build exactly the same inputs. Only outputs are stored here.
"""
