// The C++ API an embedder uses, in one include (docs/EMBEDDING.md).
//
//   engine (pmlmig::engine, library pmlmig::engine):
//     VmControl            what pmlmig needs from the embedder's VM (vm_control.h)
//     DirtyTracker, CreateTracker, UnionTracker, UserspaceWriteTracker
//                          KVM's dirty ring / bitmap and the VMM's own writes
//     MigrationController  the source side: one migration at a time, status,
//                          cancel, callbacks, migrated / in-doubt latches
//     SwitchoverPolicy, DowntimeLimitPolicy
//                          the switch-over decision as an object
//     MigrationSink        the transport seam on the source (an embedder with
//                          its own transport implements it)
//     VmMigrationTarget    the target side over the embedder's VM factory
//     SnapshotSink, SnapshotRestore
//                          a VM to a file (a MigrationSink) and back, eagerly
//                          or lazily (snapshot_sink.h, snapshot_restore.h)
//   transport (pmlmig::transport, library pmlmig::transport; absent from an
//   engine-only build):
//     GrpcMigrationSink    the gRPC sink (the wire of proto/migration.proto)
//     MigrationServer      the gRPC receiver; hands back the resumed VM
//     ControlServer        the control API on a unix socket (control.h)
//     HandoverSink, HandoverServer
//                          same-host handover over a unix socket (handover.h)
//
// Each header says which thread may call what. The C ABI is pmlmig/pmlmig.h.
#pragma once

#include "pmlmig/base/clock.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/migration_controller.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/engine/snapshot_restore.h"
#include "pmlmig/engine/snapshot_sink.h"
#include "pmlmig/engine/switchover_policy.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/userspace_tracker.h"
#include "pmlmig/engine/vm_control.h"
#include "pmlmig/version.h"

#if !defined(PMLMIG_NO_TRANSPORT)
#include "pmlmig/transport/control.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/transport/handover.h"
#endif
