package snapshot

// Snapshot label keys. containerd's modules export some of the remote-snapshot
// keys under different packages or not at all; every key lazycas reads or
// writes is named here, once.
const (
	// LabelSnapshotRef is the chain ID the snapshot will be committed as;
	// containerd's unpacker sets it on every layer Prepare.
	LabelSnapshotRef = "containerd.io/snapshot.ref"
	// LabelImageRef, LabelLayerDigest, LabelManifestDigest and
	// LabelImageLayers are what CRI and nerdctl (pkg/snapshotters) add.
	LabelImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelLayerDigest    = "containerd.io/snapshot/cri.layer-digest"
	LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	LabelImageLayers    = "containerd.io/snapshot/cri.image-layers"
	// LabelTOCDigest pins an eStargz layer's table of contents.
	LabelTOCDigest = "containerd.io/snapshot/stargz/toc.digest"
	// LabelRemote marks a committed snapshot that lazycas mounts from a
	// remote layer instead of holding unpacked files.
	LabelRemote = "containerd.io/snapshot/lazycas.remote"
)
