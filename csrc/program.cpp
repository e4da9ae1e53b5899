// bsconv_fast._C.Program: the op calls bsconv_fast.freeze recorded, replayed from C++ in one call
// from Python. Replayed from Python (a torch.fx program), every op call costs its interpreter,
// argument conversion and dispatch with cold caches: the kernel before it has just evicted them
// (a 10-element add takes 7-25 us after a 0.2 ms op, 2.5-4.6 us hot; measured). Here each step
// is a boxed dispatcher call on an argument stack converted once, when the program is built.
#include "program.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace bsconv_fast {
namespace {

namespace py = pybind11;

// One op call: `args` holds its arguments, those that are tensors computed at run time (inputs,
// results of earlier steps) filled in from the slots listed in `from_slots` before each call.
struct Step {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;
  std::vector<std::pair<size_t, int64_t>> from_slots;  // (argument index, slot)
  int64_t out;                                         // slot of the result (one tensor)
  std::vector<int64_t> release;                        // slots whose last use is this step
};

class Program {
 public:
  // steps: (op name, overload name, arguments, [(argument index, slot)], result slot, [slots to release]);
  // arguments are Python values, converted to the types of the op's schema (the entries filled from
  // slots are placeholders). Slots [0, n_inputs) hold the inputs.
  Program(int64_t n_inputs, int64_t n_slots, const py::list& steps, int64_t output)
      : n_inputs_(n_inputs), n_slots_(n_slots), output_(output) {
    // Python numbers where the schema takes a tensor (x.mul_(0.5) records aten::mul_.Tensor with
    // 0.5) become wrapped-number tensors, as torch.ops makes them
    torch::jit::ToIValueAllowNumbersAsTensors numbers_as_tensors(true);
    TORCH_CHECK(n_inputs >= 0 && n_inputs <= n_slots && output >= 0 && output < n_slots,
                "bsconv_fast Program: bad slot counts");
    for (const auto& item : steps) {
      const auto t = item.cast<py::tuple>();
      TORCH_CHECK(t.size() == 6, "bsconv_fast Program: a step is (op, overload, args, from_slots, out, release)");
      Step step{c10::Dispatcher::singleton().findSchemaOrThrow(t[0].cast<std::string>().c_str(),
                                                                t[1].cast<std::string>().c_str()),
                {}, {}, t[4].cast<int64_t>(), t[5].cast<std::vector<int64_t>>()};
      const auto& schema = step.op.schema();
      TORCH_CHECK(schema.returns().size() == 1 && schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                  "bsconv_fast Program: ", schema.name(), " does not return one tensor");
      const auto args = t[2].cast<py::list>();
      TORCH_CHECK(args.size() == schema.arguments().size(), "bsconv_fast Program: ", schema.name(), " takes ",
                  schema.arguments().size(), " arguments, got ", args.size());
      for (const auto& [index, slot] : t[3].cast<std::vector<std::pair<size_t, int64_t>>>()) {
        TORCH_CHECK(index < args.size() && slot >= 0 && slot < n_slots, "bsconv_fast Program: bad slot argument");
        step.from_slots.emplace_back(index, slot);
      }
      for (size_t i = 0; i < args.size(); ++i) {
        const bool from_slot = std::any_of(step.from_slots.begin(), step.from_slots.end(),
                                           [i](const auto& s) { return s.first == i; });
        step.args.push_back(from_slot ? c10::IValue() : torch::jit::toIValue(args[i], schema.arguments()[i].type()));
      }
      TORCH_CHECK(step.out >= n_inputs && step.out < n_slots, "bsconv_fast Program: bad result slot");
      steps_.push_back(std::move(step));
    }
  }

  // Remember these tensors' version counters: run() returns nothing once one has moved (an in-place
  // update of a weight the recorded calls were derived from). Inference tensors have no counter and
  // cannot change outside inference mode; they are not watched.
  void watch(const std::vector<at::Tensor>& tensors) {
    watched_.clear();
    for (const auto& t : tensors) {
      if (!t.is_inference()) watched_.emplace_back(t, t._version());
    }
  }

  // The program's output, or nothing when a watched tensor has changed since watch().
  std::optional<at::Tensor> run(const std::vector<at::Tensor>& inputs) const {
    if (!current()) return std::nullopt;
    return execute(inputs, nullptr);
  }

  // Record the signature (shape, strides, dtype, device) of the inputs the program was recorded for.
  void expect(const std::vector<at::Tensor>& inputs) {
    expected_.clear();
    for (const auto& t : inputs) expected_.push_back({t.sizes().vec(), t.strides().vec(), t.scalar_type(), t.device()});
  }

  // Frozen.forward's fast path, its guards checked here: the output, or None where its Python path
  // must decide (an input that is not a tensor, another signature, an input that requires grad with
  // grad mode on, a watched tensor that has changed; a program that expect() never saw). The Python
  // guards run with the caches each forward has just filled with its own data: they took 39-56 us of
  // a cifar_mobilenetv1_w1_bsconvu forward (2.9-3.6 ms, 2 threads), 1-2 us when timed hot (measured).
  py::object run_if_expected(const py::tuple& inputs) const {
    if (inputs.size() != expected_.size() || expected_.empty()) return py::none();
    std::vector<at::Tensor> tensors;
    tensors.reserve(inputs.size());
    const bool grad = at::GradMode::is_enabled();
    for (size_t i = 0; i < inputs.size(); ++i) {
      PyObject* obj = inputs[i].ptr();
      if (!THPVariable_Check(obj)) return py::none();
      const at::Tensor& t = THPVariable_Unpack(obj);
      const Signature& e = expected_[i];
      if (t.sizes() != e.sizes || t.strides() != e.strides || t.scalar_type() != e.dtype || t.device() != e.device ||
          (grad && t.requires_grad())) {
        return py::none();
      }
      tensors.push_back(t);
    }
    std::optional<at::Tensor> out;
    {
      py::gil_scoped_release no_gil;
      out = run(tensors);
    }
    return out.has_value() ? py::cast(std::move(*out)) : py::none();
  }

  // One run with each step timed: (op name, seconds) per step, in order.
  std::vector<std::pair<std::string, double>> profile(const std::vector<at::Tensor>& inputs) const {
    std::vector<std::pair<std::string, double>> times;
    execute(inputs, &times);
    return times;
  }

  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

 private:
  bool current() const {
    return std::all_of(watched_.begin(), watched_.end(), [](const auto& w) { return w.first._version() == w.second; });
  }

  at::Tensor execute(const std::vector<at::Tensor>& inputs, std::vector<std::pair<std::string, double>>* times) const {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == n_inputs_, "bsconv_fast Program: expected ", n_inputs_,
                " inputs, got ", inputs.size());
    std::vector<at::Tensor> slots(n_slots_);
    std::copy(inputs.begin(), inputs.end(), slots.begin());
    torch::jit::Stack stack;
    for (const Step& step : steps_) {
      const auto start = times != nullptr ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
      stack.assign(step.args.begin(), step.args.end());
      for (const auto& [index, slot] : step.from_slots) stack[index] = slots[slot];
      step.op.callBoxed(&stack);
      slots[step.out] = std::move(stack[0]).toTensor();
      for (int64_t s : step.release) slots[s].reset();  // free activations as early as the Python replay
      if (times != nullptr) {
        const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
        times->emplace_back(step.op.schema().name(), took.count());
      }
    }
    return slots[output_];
  }

  struct Signature {
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;
    at::Device device;
  };

  int64_t n_inputs_, n_slots_, output_;
  std::vector<Step> steps_;
  std::vector<Signature> expected_;
  std::vector<std::pair<at::Tensor, uint32_t>> watched_;
};

}  // namespace

void bind_program(py::module& m) {
  py::class_<Program>(m, "Program", "Recorded op calls replayed from C++ (bsconv_fast.freeze).")
      .def(py::init<int64_t, int64_t, const py::list&, int64_t>(), py::arg("n_inputs"), py::arg("n_slots"),
           py::arg("steps"), py::arg("output"))
      .def("watch", &Program::watch, py::arg("tensors"))
      .def("expect", &Program::expect, py::arg("inputs"))
      .def("run_if_expected", &Program::run_if_expected, py::arg("inputs"))
      .def("__call__", &Program::run, py::call_guard<py::gil_scoped_release>())
      .def("profile", &Program::profile, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &Program::size);
}

}  // namespace bsconv_fast
