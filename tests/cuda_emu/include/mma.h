// stand-in for the CUDA header under the host emulation (cuda_emu.h)
#pragma once
#include "cuda_emu.h"
