"""A 68-point 3D mean face (dlib / iBUG 300-W order) in EG3D's world frame, and how it was derived.

EG3D labels its photos with Deep3DFaceRecon (Deng et al. 2019), a 3DMM fit whose Basel Face Model is
research-only. This module is the project's documented stand-in: a rigid mean face whose PnP pose
(``prepare_3d.py``) gives EG3D-style camera labels. :data:`MEAN_FACE_68` was derived once by
:func:`derive_mean_face` from two public sources:

* **x, y** — the mean of dlib's 68 landmarks on the 16 real photos of the project's test data
  (``../shared/testdata/photos``: 14 FFHQ-aligned, 2 CelebA-HQ), each normalised by a least-squares similarity
  onto the first, averaged with its mirror image (dlib's left/right point pairs swapped) so the mean is frontal
  and symmetric;
* **z** — the depth of MediaPipe's canonical face mesh (``canonical_face_model.obj``, 468 vertices, in cm,
  Apache-2.0, google/mediapipe ``modules/face_geometry/data``) under each point, linearly interpolated over the
  mesh's vertices after a similarity places the mesh's nose tip, chin, outer eye corners and mouth corners
  (vertices 1, 152, 33, 263, 61, 291) on those dlib points (30, 8, 36, 45, 48, 54);
* **frame** — a scale and translation (no rotation: both are upright and frontal) put the face's five points
  (eye centres, nose tip, mouth corners) on Deep3DFaceRecon's standard five points (:data:`LM3D_STANDARD`, the
  numbers its ``load_lm3d`` returns, in its BFM units) in least squares, and ×0.27 converts BFM units to EG3D's
  world: EG3D's ``preprocess_cameras.py`` moves Deep3DFaceRecon's camera from distance 10 to radius 2.7.
  The origin is therefore Deep3DFaceRecon's, the point EG3D's crop centres on and its cameras look at.

Reproduce (matches :data:`MEAN_FACE_68` to 5e-6, the rounding of its five decimals)::

    from mm2latent.editing.align import detect_faces, predict_landmarks
    sets = []
    for path in sorted(Path("../shared/testdata/photos").glob("*.jpg")):  # celebamaskhq_0.jpg is the reference
        photo = Image.open(path).convert("RGB")
        sets.append(predict_landmarks(photo, max(detect_faces(photo), key=lambda b: b[2] * b[3])))
    derive_mean_face("canonical_face_model.obj", sets)

Limits: one rigid shape for every head (no expression, no identity), the jaw contour of dlib is a silhouette
rather than fixed points of the head, and the mesh's depth is a single person-independent average.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["LM3D_STANDARD", "MEAN_FACE_68", "MIRROR_68", "derive_mean_face", "five_points"]

#: Deep3DFaceRecon's five standard landmarks (left eye centre, right eye centre, nose tip, left and right mouth
#: corners; BFM units, y up, z toward the viewer): what EG3D's crop fits a photo's five points to.
LM3D_STANDARD = np.array([
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032535, -0.04617932, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
])
#: EG3D's radius over Deep3DFaceRecon's camera distance: BFM units -> EG3D world units.
BFM_TO_EG3D = 2.7 / 10.0

#: dlib's index of each point's mirror image (the face flipped left-right).
MIRROR_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])
# dlib points and MediaPipe canonical-mesh vertices that name the same feature (anchors of the derivation).
ANCHORS_DLIB = (30, 8, 36, 45, 48, 54)
ANCHORS_MESH = (1, 152, 33, 263, 61, 291)


def five_points(points: np.ndarray) -> np.ndarray:
    """68 points [68, D] -> the five of Deep3DFaceRecon [5, D]: eye centres, nose tip, mouth corners."""
    points = np.asarray(points, dtype=np.float64)
    assert points.shape[0] == 68, points.shape
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def _similarity(source: np.ndarray, target: np.ndarray, rotation: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares (scale, rotation [D, D], translation [D]) with target ≈ scale · source @ R.T + t."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    a, b = source - mu_s, target - mu_t
    if rotation:
        u, sigma, vt = np.linalg.svd(b.T @ a)
        d = np.ones(len(sigma))
        d[-1] = np.sign(np.linalg.det(u @ vt))
        r = u @ np.diag(d) @ vt
        scale = float((sigma * d).sum() / (a ** 2).sum())
    else:
        r = np.eye(source.shape[1])
        scale = float((a * b).sum() / (a ** 2).sum())
    return scale, r, mu_t - scale * mu_s @ r.T


def read_obj_vertices(path: str | Path) -> np.ndarray:
    """The ``v x y z`` lines of a Wavefront OBJ file [N, 3]."""
    lines = Path(path).read_text().splitlines()
    return np.array([[float(v) for v in line.split()[1:4]] for line in lines if line.startswith("v ")])


def derive_mean_face(mesh_obj: str | Path, landmark_sets: list[np.ndarray]) -> np.ndarray:
    """The 68-point mean face [68, 3] in EG3D world units (see the module docstring for the recipe).

    Args:
        mesh_obj: MediaPipe's ``canonical_face_model.obj``.
        landmark_sets: dlib's 68 points [68, 2] (image pixels, y down) of several roughly frontal photos.
    """
    from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

    sets = [np.asarray(s, dtype=np.float64) for s in landmark_sets]
    reference = sets[0]
    aligned = []
    for points in sets:
        for candidate in (points, points[MIRROR_68] * [-1, 1]):
            scale, r, t = _similarity(candidate, reference)
            aligned.append(scale * candidate @ r.T + t)
    mean_2d = np.mean(aligned, axis=0) * [1, -1]  # y up
    mesh = read_obj_vertices(mesh_obj)
    scale, _, t = _similarity(mesh[list(ANCHORS_MESH), :2], mean_2d[list(ANCHORS_DLIB)], rotation=False)
    in_mesh = (mean_2d - t) / scale  # the 2D mean in mesh centimetres
    depth = LinearNDInterpolator(mesh[:, :2], mesh[:, 2])(in_mesh)
    outside = np.isnan(depth)
    depth[outside] = NearestNDInterpolator(mesh[:, :2], mesh[:, 2])(in_mesh[outside])
    face = np.concatenate([in_mesh, depth[:, None]], axis=1)
    face = (face + face[MIRROR_68] * [-1, 1, 1]) / 2  # exactly symmetric
    scale, _, t = _similarity(five_points(face), LM3D_STANDARD, rotation=False)
    return (scale * face + t) * BFM_TO_EG3D


#: The 68-point mean face [68, 3] in EG3D world units (x toward the frontal image's right, y up, z toward the
#: frontal camera; origin: Deep3DFaceRecon's). Written by :func:`derive_mean_face`.
MEAN_FACE_68 = np.array([
    [-0.19203, 0.06330, -0.06002],
    [-0.18941, 0.01365, -0.05377],
    [-0.18432, -0.03585, -0.06958],
    [-0.17610, -0.08490, -0.06240],
    [-0.15951, -0.13154, -0.05477],
    [-0.13088, -0.17232, -0.02329],
    [-0.09240, -0.20619, 0.01458],
    [-0.04886, -0.23237, 0.04719],
    [-0.00012, -0.24024, 0.05806],
    [0.04863, -0.23237, 0.04719],
    [0.09217, -0.20619, 0.01458],
    [0.13065, -0.17232, -0.02329],
    [0.15928, -0.13154, -0.05477],
    [0.17587, -0.08490, -0.06240],
    [0.18409, -0.03585, -0.06958],
    [0.18918, 0.01365, -0.05377],
    [0.19180, 0.06330, -0.06002],
    [-0.15482, 0.10186, 0.00905],
    [-0.13248, 0.12675, 0.04185],
    [-0.09836, 0.13570, 0.06582],
    [-0.06283, 0.13220, 0.07763],
    [-0.02936, 0.11868, 0.08017],
    [0.02913, 0.11868, 0.08017],
    [0.06260, 0.13220, 0.07763],
    [0.09813, 0.13570, 0.06582],
    [0.13225, 0.12675, 0.04185],
    [0.15459, 0.10186, 0.00905],
    [-0.00012, 0.08315, 0.09082],
    [-0.00012, 0.05127, 0.11372],
    [-0.00012, 0.01904, 0.13608],
    [-0.00012, -0.01412, 0.14327],
    [-0.03688, -0.03806, 0.08447],
    [-0.01941, -0.04435, 0.09768],
    [-0.00012, -0.05005, 0.10380],
    [0.01918, -0.04435, 0.09768],
    [0.03665, -0.03806, 0.08447],
    [-0.11569, 0.07309, 0.03032],
    [-0.09573, 0.08696, 0.04451],
    [-0.07114, 0.08684, 0.04769],
    [-0.04891, 0.07047, 0.04790],
    [-0.07220, 0.06665, 0.04594],
    [-0.09658, 0.06635, 0.04218],
    [0.04868, 0.07047, 0.04790],
    [0.07091, 0.08684, 0.04769],
    [0.09550, 0.08696, 0.04451],
    [0.11545, 0.07309, 0.03032],
    [0.09635, 0.06635, 0.04218],
    [0.07197, 0.06665, 0.04594],
    [-0.08059, -0.09888, 0.05597],
    [-0.05162, -0.08542, 0.07863],
    [-0.02144, -0.07884, 0.09881],
    [-0.00012, -0.08327, 0.10169],
    [0.02121, -0.07884, 0.09881],
    [0.05139, -0.08542, 0.07863],
    [0.08036, -0.09888, 0.05597],
    [0.05280, -0.12894, 0.06716],
    [0.02317, -0.14249, 0.07984],
    [-0.00012, -0.14483, 0.08316],
    [-0.02340, -0.14249, 0.07984],
    [-0.05303, -0.12894, 0.06716],
    [-0.06897, -0.10021, 0.05929],
    [-0.02177, -0.09544, 0.07830],
    [-0.00012, -0.09746, 0.08380],
    [0.02154, -0.09544, 0.07830],
    [0.06874, -0.10021, 0.05929],
    [0.02218, -0.11689, 0.08789],
    [-0.00012, -0.11929, 0.09231],
    [-0.02241, -0.11689, 0.08789],
])
