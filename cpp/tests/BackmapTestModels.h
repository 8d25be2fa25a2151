#ifndef BACKMAP_TEST_MODELS_H_
#define BACKMAP_TEST_MODELS_H_

/*
 * TorchScript modules for the C++ tests, compiled here with torch::jit (no Python needed), and
 * returned as the bytes torch.jit.save would write.
 */

#include <torch/script.h>
#include <sstream>
#include <string>

namespace BackmapTest {

inline std::string saveModule(torch::jit::Module& module) {
    std::ostringstream out;
    module.save(out);
    return out.str();
}

/** E = k * sum |r_i|^2 with a fixed k; forces -2 k r. */
inline std::string harmonicModule(double k) {
    torch::jit::Module m("__torch__.Harmonic");
    m.register_attribute("k", c10::FloatType::get(), k);
    m.define(R"(
def forward(self, positions: Tensor) -> Tensor:
    return self.k * torch.sum(positions * positions)
)");
    return saveModule(m);
}

/** E = k * sum |r_i|^2 with k a global parameter; dE/dk = sum |r_i|^2. */
inline std::string harmonicParameterModule() {
    torch::jit::Module m("__torch__.HarmonicParameter");
    m.define(R"(
def forward(self, positions: Tensor, k: Tensor) -> Tensor:
    return k * torch.sum(positions * positions)
)");
    return saveModule(m);
}

/** Periodic: E = sum |r_i|^2 + trace(box); the box term does not change forces. */
inline std::string periodicModule() {
    torch::jit::Module m("__torch__.Periodic");
    m.define(R"(
def forward(self, positions: Tensor, box: Tensor) -> Tensor:
    return torch.sum(positions * positions) + torch.trace(box)
)");
    return saveModule(m);
}

/** A float32 model: E = scale * sum |r_i|^2 with a float32 parameter scale. */
inline std::string float32Module(float scale) {
    torch::jit::Module m("__torch__.Float32");
    m.register_parameter("scale", torch::full({1}, scale, torch::kFloat32), false);
    m.define(R"(
def forward(self, positions: Tensor) -> Tensor:
    return torch.sum(self.scale * torch.sum(positions * positions))
)");
    return saveModule(m);
}

/**
 * A nonlinear pair model: E = sum_{i<j} [exp(-d_ij^2 / s^2) + 0.1 (d_ij - 0.5)^2] + sum tanh(x_i).
 */
inline std::string pairModule() {
    torch::jit::Module m("__torch__.Pair");
    m.define(R"(
def forward(self, positions: Tensor) -> Tensor:
    n = positions.shape[0]
    delta = positions.unsqueeze(0) - positions.unsqueeze(1)
    pairs = torch.triu_indices(n, n, 1)
    d = torch.sqrt(torch.sum(delta[pairs[0], pairs[1]] ** 2, dim=-1))
    return torch.sum(torch.exp(-d * d / 0.09) + 0.1 * (d - 0.5) ** 2) + torch.sum(torch.tanh(positions[:, 0]))
)");
    return saveModule(m);
}

/** A module that returns a vector, not a scalar energy. */
inline std::string vectorOutputModule() {
    torch::jit::Module m("__torch__.Vector");
    m.define(R"(
def forward(self, positions: Tensor) -> Tensor:
    return torch.sum(positions * positions, dim=1)
)");
    return saveModule(m);
}

} // namespace BackmapTest

#endif
