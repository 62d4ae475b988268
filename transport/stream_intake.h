// StreamIntake: the receiver's side of one data stream, whichever carries
// it (a gRPC Pages call, PagesReactor; or a direct TCP connection,
// direct_receiver.h): attaching to the session and its stream index,
// admitting each batch (receiver_checks.h), applying it (BatchApplier) and
// accounting for it, and what the session learns when the stream refuses a
// batch, breaks or ends. The carrier reads and decodes; this does the rest.
//
// Thread-safety: one carrier thread at a time calls Handle/Refuse/Broke/
// Done (gRPC runs a call's reactions one at a time; a direct connection has
// one thread). The session state is guarded by Receiver::mu_, taken here
// for bookkeeping only, never while a batch is applied.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "batch_codec.h"
#include "migration.pb.h"
#include "receiver.h"

namespace pmlmig::transport {

class StreamIntake {
 public:
  // `self` is what the session calls to end the stream (Abandon).
  StreamIntake(Receiver& receiver, DataCall* self) : r_(receiver), self_(self) {}

  // Attaches the stream to session `session_id` (it must be the migration
  // in progress, receiving) as stream `index`.
  Status Attach(uint64_t session_id, uint32_t index);
  // Admits, applies and accounts one decoded batch (`payload` is its page
  // data, `wire_bytes` what it took on the wire); attaches first if this
  // is the stream's first batch. Returns its ack.
  Result<proto::BatchAck> Handle(const proto::PageBatch& batch, Chunks payload, uint64_t wire_bytes);

  // Handle without a staging copy, for a carrier that can read a batch's
  // payload wherever it is told (a direct connection). Admits `batch`
  // (attaching first) before its payload of `payload_len` bytes is read.
  // True: read it into in_place_dest(), in order, feeding in_place_hash()
  // as the bytes land, then call FinishInPlace, or AbandonInPlace if the
  // read fails; the target's memory exists until then. False: nothing is
  // held; read the payload into a buffer and Handle it
  // (BatchApplier::PlanInPlace says when).
  Result<bool> BeginInPlace(const proto::PageBatch& batch, uint64_t payload_len);
  std::span<const std::span<uint8_t>> in_place_dest() const { return in_place_dest_; }
  PayloadHash& in_place_hash() { return *in_place_hash_; }
  Result<proto::BatchAck> FinishInPlace(const proto::PageBatch& batch, uint64_t wire_bytes);
  void AbandonInPlace();
  // The stream's first message did not decode: remembered as the cause to
  // report if the source then leaves (it could be anyone's).
  void NoteUndecodable(const Status& s);
  // Refuses a batch: the stream leaves the session (so the session's
  // teardown does not end it again) and the migration fails with `s`.
  Status Refuse(const Status& s);
  // The stream broke (`broke` says how) while attached: the migration fails.
  void Broke(const Status& broke);
  // The stream is over (after its end, a refusal or a break).
  void Done();

  bool attached() const { return attached_; }
  uint32_t index() const { return index_; }

 private:
  Status AttachLocked(uint64_t session_id, uint32_t index);
  // A batch's admission: the checks and raising the session's `applying`,
  // so that its target stays until Settle (or AbandonInPlace) lowers it.
  Status Admit(const proto::PageBatch& batch);
  // Accounts for an admitted batch as `applied` says, and lowers `applying`.
  Result<proto::BatchAck> Settle(const proto::PageBatch& batch, const Result<ApplyResult>& applied,
                                 uint64_t wire_bytes);

  // What Admit found, for the batch between Admit and Settle.
  struct Admitted {
    const engine::SlotTable* memory = nullptr;
    engine::PageDigestTable* digests = nullptr;  // verifying: updated after each write
    std::shared_ptr<PopulateAhead> populate;     // round 0: told where data arrived
    bool in_place = false;                       // read by BeginInPlace's plan
  };

  Receiver& r_;
  DataCall* const self_;
  // Written only by the carrier's thread, under Receiver::mu_ where other
  // threads read them.
  std::shared_ptr<Session> session_;  // set by Attach naming the current session
  uint32_t index_ = 0;
  bool attached_ = false;  // per_stream[index_].call is self_
  BatchApplier applier_;
  SlotFiles files_;  // of the session's target memory, once attached
  Admitted admitted_;
  std::vector<std::span<uint8_t>> in_place_dest_;  // BeginInPlace's plan
  std::optional<PayloadHash> in_place_hash_;
};

}  // namespace pmlmig::transport
