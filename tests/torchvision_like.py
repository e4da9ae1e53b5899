"""Small copies of torchvision's model blocks (torchvision is not a test dependency; its CUDA wheels do not load
against a CPU PyTorch): same class names, attributes and forward code as torchvision 0.28's resnet.py,
mobilenetv2.py, mobilenetv3.py and ops/misc.py, and their torchvision module names (optimize() rewrites
torchvision's blocks only), so that optimize() meets what a user's torchvision model holds. Widths and depths
are cut down; layers are only what the forward code needs."""
import torch.nn as nn


def conv_norm_act(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    """torchvision.ops.Conv2dNormActivation: an nn.Sequential of conv, BatchNorm2d and the activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act is not None else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_norm_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_norm_act(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def mobilenet_v2(width=8):
    """torchvision.models.MobileNetV2's layer pattern at a fraction of its width and depth: the stem, one
    block without expansion, blocks with and without the skip connection, the 1x1 head."""
    features = [conv_norm_act(3, width, stride=2), InvertedResidual(width, width, 1, 1),
                InvertedResidual(width, 2 * width, 2, 6), InvertedResidual(2 * width, 2 * width, 1, 6),
                InvertedResidual(2 * width, 3 * width, 1, 4), conv_norm_act(3 * width, 8 * width, 1)]
    return nn.Sequential(*features)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, x):
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x):
        scale = self._scale(x)
        return scale * x


class InvertedResidualV3(nn.Module):
    """torchvision.models.mobilenetv3.InvertedResidual (named so below): expand, depthwise, squeeze-excitation,
    projection in `block`, the skip added in place."""

    def __init__(self, inp, hidden, oup, k, stride, act):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        self.block = nn.Sequential(conv_norm_act(inp, hidden, 1, act=act),
                                   conv_norm_act(hidden, hidden, k, stride, groups=hidden, act=act),
                                   SqueezeExcitation(hidden, hidden // 4), conv_norm_act(hidden, oup, 1, act=None))

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


InvertedResidualV3.__name__ = "InvertedResidual"  # what optimize() matches, as in torchvision


def mobilenet_v3(width=8, hidden=1024):
    """torchvision.models.MobileNetV3's layer pattern, cut down: a Hardswish stem, blocks with squeeze-excitation
    (with and without the skip, ReLU and Hardswish, 3x3 and 5x5), pooling and its classifier (Linear ->
    Hardswish -> Dropout -> Linear)."""
    return nn.Sequential(conv_norm_act(3, width, stride=2, act=nn.Hardswish),
                         InvertedResidualV3(width, 4 * width, 2 * width, 5, 2, nn.ReLU),
                         InvertedResidualV3(2 * width, 6 * width, 8 * width, 3, 1, nn.Hardswish),
                         InvertedResidualV3(8 * width, 12 * width, 8 * width, 3, 1, nn.Hardswish),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Sequential(nn.Linear(8 * width, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                       nn.Linear(hidden, 100)))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (stride on the 3x3 conv)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet with two stages of one block each and 10 classes."""

    def __init__(self, block, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        out = width * getattr(block, "expansion", 1)
        down1 = None if out == width else nn.Sequential(nn.Conv2d(width, out, 1, 1, bias=False), nn.BatchNorm2d(out))
        self.layer1 = nn.Sequential(block(width, width, 1, down1))
        down2 = nn.Sequential(nn.Conv2d(out, 2 * out, 1, 2, bias=False), nn.BatchNorm2d(2 * out))
        self.layer2 = nn.Sequential(block(out, 2 * out // getattr(block, "expansion", 1), 2, down2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * out, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


# torchvision's module names: optimize() takes a block's forward as torchvision's only for classes from there
for _cls, _module in ((InvertedResidual, "mobilenetv2"), (InvertedResidualV3, "mobilenetv3"),
                      (BasicBlock, "resnet"), (Bottleneck, "resnet"), (ResNet, "resnet")):
    _cls.__module__ = f"torchvision.models.{_module}"
SqueezeExcitation.__module__ = "torchvision.ops.misc"
