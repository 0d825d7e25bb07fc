// embed.cpp: the C++ wrapper from an installed fewstep. Prints the contract and the sum of a batch.
//   embed ENGINE.onnx SEED BATCH
#include <cstdio>
#include <cstdlib>
#include <fewstep.hpp>
#include <numeric>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: embed ENGINE.onnx SEED BATCH\n");
    return 2;
  }
  try {
    fewstep::EngineOptions opt;
    opt.intra_op_threads = 1;
    const fewstep::Engine engine(argv[1], opt);
    const long long batch = std::atoll(argv[3]);
    std::vector<int64_t> labels;
    for (long long i = 0; engine.info().num_classes && i < batch; ++i) labels.push_back(i % engine.info().num_classes);
    const std::vector<float> x = engine.sample(std::strtoull(argv[2], nullptr, 10), batch, labels);
    std::printf("fewstep %s nfe=%d floats=%zu sum=%.9g\n", fewstep::version().c_str(), engine.info().nfe, x.size(),
                std::accumulate(x.begin(), x.end(), 0.0));
  } catch (const fewstep::Error& e) {
    std::fprintf(stderr, "error (%s): %s\n", fewstep_status_string(e.status()), e.what());
    return 1;
  }
  return 0;
}
