// The all-reduce of a tensor-parallel group whose ranks live in different processes (or on
// different machines): each rank's partial sums travel to every other rank as CAF messages, so
// the middleman carries them between nodes like any other actor message.
//
// Each rank owns a NetworkAllReduce (the engine's AllReduce) and, beside it, an endpoint actor
// that receives the other ranks' partials into the rank's inbox. A sum() sends the rank's
// partial to every peer's endpoint, waits (bounded) until every peer's partial of the same call
// is in, then adds them in rank order ((p0 + p1) + p2 ...), the order LocalAllReduceGroup uses,
// so every rank holds the same bits and the group gives the tokens of an in-process group.
//
// Calls are numbered: the ranks run the same forward passes, so their n-th sums match. A
// partial that arrives early (a fast peer already in its next sum) waits in the inbox for it.
// A peer whose endpoint goes down (its process died, its node was declared down), or a sum
// that waits longer than the timeout, aborts the group: that sum and every later one throws
// Error(unavailable) naming the rank, and the shard gives up so its scheduler rebuilds the group.
//
// Partial sums are the one message that is not a Cap'n Proto structure: a plain float array
// (ReducePart, actors/wire.hpp) that CAF serializes as one block of bytes (the ranks share one byte order: every
// node runs on x86-64 or another little-endian machine).
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"  // EndpointActor
#include "runtime/tensor_parallel.hpp"

namespace celer {

class NetworkAllReduce : public AllReduce {
 public:
  // Spawns this rank's endpoint in `sys`. `timeout` bounds each wait for the peers' partials.
  NetworkAllReduce(caf::actor_system& sys, int rank, int size, std::chrono::milliseconds timeout);
  ~NetworkAllReduce() override;  // stops the endpoint
  NetworkAllReduce(const NetworkAllReduce&) = delete;
  NetworkAllReduce& operator=(const NetworkAllReduce&) = delete;

  // The actor the other ranks send this rank's share to.
  const EndpointActor& endpoint() const { return endpoint_; }
  // Every rank's endpoint, in rank order (this one's included); monitored from now on. Sums
  // before this throw.
  void connect(std::vector<EndpointActor> endpoints);
  bool connected() const;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void sum(float* data, int64_t n) override;  // throws Error(unavailable) once aborted

  // Wakes a waiting sum() and fails it and every later one with `why`.
  void abort(const std::string& why);

  struct Inbox;

 private:
  int rank_, size_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<Inbox> inbox_;
  EndpointActor endpoint_;
  std::vector<EndpointActor> peers_;  // [size]; peers_[rank_] is endpoint_
  uint64_t calls_ = 0;
  std::vector<float> own_;  // this rank's partial of the current call (the sum overwrites data)
  std::vector<std::vector<uint8_t>> arrived_;  // the peers' partials of the current call, by rank
};

}  // namespace celer
