import subprocess
import sys

import torch

import kanc
from kanc.nn import GRKANLinear, GroupRational


def test_import_does_not_load_triton():
    code = "import sys, kanc; assert 'triton' not in sys.modules, 'import kanc pulled in triton'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_identity_rational_is_exact():
    x = torch.randn(3, 5, 16)
    layer = GroupRational(16, groups=4)
    assert torch.equal(layer(x), x)
    lin = GRKANLinear(16, 7, groups=4)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_version():
    assert kanc.__version__
