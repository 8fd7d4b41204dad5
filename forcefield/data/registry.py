"""Downloadable datasets: official addresses, SHA-256 checksums, download and verification.

Three datasets are registered (see :data:`DATASETS`):

``rmd17``
    The revised MD17 data as pre-split npz files (5 train/test splits of 1000 frames per
    molecule, ~110 MB in all) from GitHub ``andersx/rmd17-npz`` pinned at commit
    :data:`RMD17_NPZ_COMMIT`. Stored as ``<data_dir>/rmd17/rmd17_<mol>_<split>_<0N>.npz``.
    This is what :func:`forcefield.data.load_rmd17` reads by default.
``rmd17-figshare``
    The upstream figshare tarball ``rmd17.tar.bz2`` (~1 GB: 100k frames per molecule plus
    the split index files). Extracted into ``<data_dir>`` it gives ``rmd17/npz_data/`` and
    ``rmd17/splits/``, which :func:`~forcefield.data.load_rmd17` also reads.
``md17``
    The original MD17 npz files from quantum-machine.org (sGDML).

Checksums
    * ``rmd17``: SHA-256 of every file, generated from the verified staged copy
      (``SHA256SUMS`` of the project's reference data, commit above).
    * ``rmd17-figshare``: SHA-256 ``cddeea2e...922b``, size 1,066,301,513 bytes and MD5
      ``cb1a9276...3d18``, as recorded in public dataset-ingestion code; the first 12 hex digits
      are independently confirmed by the load-atoms importer (jla-gardner/load-atoms,
      ``src/load_atoms/database/importers/rmd17.py``, ``expected_hash="cddeea2ec2c4"``).
    * ``md17``: no published checksum was found, so ``sha256`` is ``None``. On first download
      the file's SHA-256 is printed and recorded next to it as ``<file>.sha256``
      (trust on first use); :func:`verify` and later downloads check against that record.

Downloads stream through :mod:`urllib` to a temporary file in the destination folder, are
hashed while streaming, verified, and only then renamed into place (atomic on POSIX), so an
interrupted download never leaves a truncated file under the final name.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..files import atomic_write
from .paths import PathLike, resolve_data_dir

__all__ = [
    "RMD17_MOLECULES", "MD17_MOLECULES", "RMD17_NPZ_COMMIT", "RemoteFile", "DatasetEntry", "DATASETS",
    "DownloadError", "ChecksumError", "FileStatus", "download", "fetch", "verify", "files_for",
    "sha256sum", "MOLECULE_ALIASES", "molecule_key",
]

#: The ten rMD17 molecules (canonical names, as in the upstream file names).
RMD17_MOLECULES: Tuple[str, ...] = (
    "aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde",
    "naphthalene", "paracetamol", "salicylic", "toluene", "uracil",
)

#: The original MD17 molecules distributed as ``md17_<name>.npz`` by quantum-machine.org.
MD17_MOLECULES: Tuple[str, ...] = (
    "aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic", "toluene", "uracil",
)

#: Other names of the MD17 molecules (lower case) -> their canonical name.
MOLECULE_ALIASES: Dict[str, str] = {"salicylic acid": "salicylic", "salicylic_acid": "salicylic",
                                    "salicylic-acid": "salicylic"}


def molecule_key(name: str) -> str:
    """A molecule name as the tables spell it: lower case, aliases resolved ("Salicylic acid" -> "salicylic")."""
    key = str(name).strip().lower()
    return MOLECULE_ALIASES.get(key, key)


#: Commit of github.com/andersx/rmd17-npz whose files the ``rmd17`` checksums describe.
RMD17_NPZ_COMMIT = "4f6bb0a186822c90d47cd98b7a27991fe0b3173b"
_RMD17_NPZ_RAW = f"https://raw.githubusercontent.com/andersx/rmd17-npz/{RMD17_NPZ_COMMIT}"

_USER_AGENT = "oreo-data-download (python-urllib)"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched (offline, unreachable server, HTTP error)."""


class ChecksumError(DownloadError):
    """A fetched or existing file does not match its recorded SHA-256."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file.

    ``path`` is where it lives below the data directory (POSIX form). ``molecule`` is None
    for files needed whatever molecules are requested (README, LICENSE, a tarball).
    ``archive_members`` is a pattern such as ``"rmd17/npz_data/rmd17_{molecule}.npz"`` for
    tarballs that are extracted into the data directory; molecule files not asked for are
    skipped during extraction.
    """
    path: str
    url: str
    sha256: Optional[str]
    size: Optional[int] = None
    md5: Optional[str] = None
    mirrors: Tuple[str, ...] = ()
    molecule: Optional[str] = None
    archive_members: Optional[str] = None

    @property
    def urls(self) -> Tuple[str, ...]:
        return (self.url,) + tuple(self.mirrors)

    @property
    def is_archive(self) -> bool:
        return self.archive_members is not None


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset of the registry."""
    name: str
    description: str
    files: Tuple[RemoteFile, ...]
    molecules: Tuple[str, ...]
    homepage: str
    license: Optional[str]
    citation: str


# SHA-256 and size in bytes of the files of github.com/andersx/rmd17-npz at RMD17_NPZ_COMMIT
# (npz files under rmd17-npz/, README.md and LICENSE at the repository root), generated from
# the verified reference copy's SHA256SUMS. Local path: <data_dir>/rmd17/<name>.
_RMD17_NPZ_FILES: Dict[str, Tuple[str, int]] = {
    "rmd17_aspirin_test_01.npz": ("a3c3b61e782d01e6dd649a126004903f7873e8e7ee5034135abfdb8873be711d", 1537803),
    "rmd17_aspirin_test_02.npz": ("445e26aa2253dcf7e8d9386785c4a9cea69f1e196f54fbd69a969c53177a1a9c", 1537803),
    "rmd17_aspirin_test_03.npz": ("818d5bbb8c8ff17bd049ab09e2614354b0a8a21a1cd5667bc13e934247162a36", 1537803),
    "rmd17_aspirin_test_04.npz": ("724b808f3ed9eb542b864e14982aa2246a4c5098165b86ec8b22e893cd9271c5", 1537803),
    "rmd17_aspirin_test_05.npz": ("03e1e6673698867c73e3be38a37a19b062ed49a4961aee21e67702db869f3d9d", 1537803),
    "rmd17_aspirin_train_01.npz": ("d460f0e43a1a9411b55cdcd9cdbeb9466ae62851ac91392516ab88e4ebc68143", 1537803),
    "rmd17_aspirin_train_02.npz": ("8a5699756e1a9c2bc30c22985cff03b45cb1eb36550941d742d8ce5abfac2d01", 1537803),
    "rmd17_aspirin_train_03.npz": ("9153827bb89e26d43e9e590d35d5572dd0b535a190a3486c320c75494aa94a7c", 1537803),
    "rmd17_aspirin_train_04.npz": ("c086ab96170e5bdc0363674d1e5d6ea9786a7a76fca286eb87f35850b5e21c13", 1537803),
    "rmd17_aspirin_train_05.npz": ("25cc9584b5cd79f63d56d051bab326e18077b3719f8f45807747fbfa6a55e7ed", 1537803),
    "rmd17_azobenzene_test_01.npz": ("e83c87fe541a95e7349684e47294821ada708a780b59c469d3792588213cfc05", 1753806),
    "rmd17_azobenzene_test_02.npz": ("d40465898d81b26acecd3cf87ace552f71e125321b6a7f1086a7d4b9840d2a8d", 1753806),
    "rmd17_azobenzene_test_03.npz": ("50b509d220d2b4ef9d2837d41a216f68145a7e8e432d94063ee4137b60b127fe", 1753806),
    "rmd17_azobenzene_test_04.npz": ("ebf2c9fd9005da1a1ca583e236bf212ccd97fdf6c628cb20730e437473efa523", 1753806),
    "rmd17_azobenzene_test_05.npz": ("b051536d5df3fd149eefbb8acef2a395288b30d4915d970271ee1384bb439abf", 1753806),
    "rmd17_azobenzene_train_01.npz": ("7a2ce543773f6cb7a2cccecbc37fd479781e27ec2d0bb4e5f9ecff8e404e5857", 1753806),
    "rmd17_azobenzene_train_02.npz": ("ecab4b730743f7c39ad244bc1295b5100871208c3ac549626752ac5275fc41e0", 1753806),
    "rmd17_azobenzene_train_03.npz": ("4ed337325ec4bbdaa3f28e675e78198d924e3c5d649b8641a9b52488f89682bc", 1753806),
    "rmd17_azobenzene_train_04.npz": ("4cad310d0063acb842163c1f9832d0732840ad66e3d67f10100919b2577a16c4", 1753806),
    "rmd17_azobenzene_train_05.npz": ("9fa7591791cde255c10e0668116dd2a914c80de9f5cb16d796139e7a7e7c54e3", 1753806),
    "rmd17_benzene_test_01.npz": ("4aad4aa2f5ae6aa78d2d9f5da7cb285c97864cfbdf054b67de12a1429b249534", 889794),
    "rmd17_benzene_test_02.npz": ("a6e4243266892db8877157e9aeee04a685869aab22dfa9b2da34a4947cc2ddca", 889794),
    "rmd17_benzene_test_03.npz": ("ca3f8d62e0b1bf9416dbcce4d8898adef4dd6251a820705c844d79cf6a670b1a", 889794),
    "rmd17_benzene_test_04.npz": ("795ec0c6c6511fbc543653d58d6a2250dc18ef39a0bb06a3ca29dba307d90d10", 889794),
    "rmd17_benzene_test_05.npz": ("9824b627d03ec61924f3df027d6eb37e4edbeb6eac6e9db08cc004acd4e2836a", 889794),
    "rmd17_benzene_train_01.npz": ("6e69deb5dc8663c2d2461cc50e522c74742acea7b4185da348fc08585a15cdc7", 889794),
    "rmd17_benzene_train_02.npz": ("baa8b8448dbe2f9e9bd5958de9f89f46a63c6504c0c0c24f0e4ac0c0e76524fc", 889794),
    "rmd17_benzene_train_03.npz": ("dcff45304807aba6666afeae17fdbc2e6833e720b111fb01e42a71b06e6e50f6", 889794),
    "rmd17_benzene_train_04.npz": ("0eb0b571ae4c8fcf7fac2f90ad0d2aaf0820d031ee191f5508172b2a8a43f731", 889794),
    "rmd17_benzene_train_05.npz": ("3bb6c8bb7650cf4768e740d9839d01f2f162c0c3fc3223598aeb4fcbb6c8500a", 889794),
    "rmd17_ethanol_test_01.npz": ("c3594a0f93d5992e02f9eb671392fb2e5021b3fa4f902417886966d1e4f64e1e", 673791),
    "rmd17_ethanol_test_02.npz": ("b3276f23d28d4588d008e19ad68e784278caf58e90c7139a11cd7e950b8d3eb4", 673791),
    "rmd17_ethanol_test_03.npz": ("1ba5586225c0439d5880c4b860e5a84dde042f947b90667178bb6f819241c284", 673791),
    "rmd17_ethanol_test_04.npz": ("1ec462b9333e7984ac97fefe66294ca51cceb64c8e4afd24d9d8124b81fa6fb0", 673791),
    "rmd17_ethanol_test_05.npz": ("af80798e2c0b309b8ad65a5c539651089c3d7f8d0528686c4a74e2132ecc9a1f", 673791),
    "rmd17_ethanol_train_01.npz": ("096946747b8d9dcfa042b44f8debbd3da387dfe1586b659e3be789cc4927316a", 673791),
    "rmd17_ethanol_train_02.npz": ("b4bd8ed96ffaa31fe50634ab8705684151011033c3dd73927d61931fc8fda863", 673791),
    "rmd17_ethanol_train_03.npz": ("26a3a378a63486cb8b127f0f4a8af861996a1759d59e9457288cf11d86967cae", 673791),
    "rmd17_ethanol_train_04.npz": ("14796fc0c778e089292e514aee2592b8c4395f7ce4648c8aa22e19030421d0da", 673791),
    "rmd17_ethanol_train_05.npz": ("fa8b76b36482fff572fc01f62120403c7e6678f5d13f302362e4c9e1cd57a8a6", 673791),
    "rmd17_malonaldehyde_test_01.npz": ("147404574d4fe3204dea7eb3799426d264e36b7900012f27fd2d26a26832fdaf", 673791),
    "rmd17_malonaldehyde_test_02.npz": ("d0977dc7f47a25aee87d7deaccd90e81c20d20aff7f3ece37a7d526a540aa867", 673791),
    "rmd17_malonaldehyde_test_03.npz": ("8426e80062701f13f304ece6512999bd2520b990eb5106eb68224a89f2f145f1", 673791),
    "rmd17_malonaldehyde_test_04.npz": ("586cd71435f574eb470841b0567b2963d7883618d4cf45902ee04f27c176480a", 673791),
    "rmd17_malonaldehyde_test_05.npz": ("99604748d2f2fe42984642daa882cde193902a610701fa67c724b5d6c082a10b", 673791),
    "rmd17_malonaldehyde_train_01.npz": ("95723385cdfd7f8446a84cdff607f14901e4c2b3949db7a965147dc5098d8ee1", 673791),
    "rmd17_malonaldehyde_train_02.npz": ("ff161de4f1dfa21f80b9225c8489dc2f267a5361ad39e59e20e898db09933786", 673791),
    "rmd17_malonaldehyde_train_03.npz": ("c83c94ca912339763586ccd4220d48f61308e33975ee1ba06d0c12645ecf7975", 673791),
    "rmd17_malonaldehyde_train_04.npz": ("347b7702c49da472e1d7f1cc052f2ce0e89524b14a4b6fca4813415bbab1e7e3", 673791),
    "rmd17_malonaldehyde_train_05.npz": ("9a7055ba3cd97451f34fd9d6f8e818306860b7167f9efb80a14cd09605afdfea", 673791),
    "rmd17_naphthalene_test_01.npz": ("80a19bca6aaa5cdf241007d6a7332e7b96a8e6ef362c1badcdb86a574ac3fe06", 1321800),
    "rmd17_naphthalene_test_02.npz": ("de682a3e54de5276bcb1f6970f1bcb82452754815d970c783fe089978c66bee6", 1321800),
    "rmd17_naphthalene_test_03.npz": ("3deb283fb3c46fca12fbff16ffc10b1d023a40c3e92d1c26796ecf516f2c817d", 1321800),
    "rmd17_naphthalene_test_04.npz": ("68b215a3e506dcfc48187e49c5f9bc3dafe2033123cd5a7dfd665f561fb9d729", 1321800),
    "rmd17_naphthalene_test_05.npz": ("f15dd32658f3a9cac8fff91443989ffbe9701dcf356528331770efd62efb487c", 1321800),
    "rmd17_naphthalene_train_01.npz": ("940f41110785fb0d3fa5feac68800cf4c68bd05fd55d563d3adacf5247d7688a", 1321800),
    "rmd17_naphthalene_train_02.npz": ("2b5dac7969803d83d9625979651c44d10368d65839781776095a5e4beeba46b7", 1321800),
    "rmd17_naphthalene_train_03.npz": ("afeeb82c0f220e6ab03d514895a0ae55ceb2373c0a9af2fb8cafa85ff2d900c8", 1321800),
    "rmd17_naphthalene_train_04.npz": ("696494def32844c8e6eb016395f50ceaa767e6a22f1688d4f3c6dc19cc83b192", 1321800),
    "rmd17_naphthalene_train_05.npz": ("cfbfbf744ff3c8d8411c8ee745841037a78da73ecf7a6a08675e66bd822178ca", 1321800),
    "rmd17_paracetamol_test_01.npz": ("99e09ff10b54c55830c011c0959b643bede0512a89ae5b5b9a11e8abea9b3eaa", 1465802),
    "rmd17_paracetamol_test_02.npz": ("9090bc53b4f7a72ebaaab1362f6311341d64f9c94469f4509137c288e8930fe3", 1465802),
    "rmd17_paracetamol_test_03.npz": ("30bae2bfdaa812622af510939d29867546345d8a3f02f87e0413dc4aed9b4b73", 1465802),
    "rmd17_paracetamol_test_04.npz": ("02c58f916ad306ba70cd7c2b144ff70a9c264d0aab129461d29782c0fc185a65", 1465802),
    "rmd17_paracetamol_test_05.npz": ("0f6565c5afccac589398af91fbfa8fd6a7d41e05f589e380ce4f62aee0fa5956", 1465802),
    "rmd17_paracetamol_train_01.npz": ("819513d42011a63773ff1baf61b06f9f0884370fbdb6539d6f11fc6cb580a0ba", 1465802),
    "rmd17_paracetamol_train_02.npz": ("c77e51f5101eec50d14deb7033cd0e7bfea858ddd61b37309702ade55ec3b1ff", 1465802),
    "rmd17_paracetamol_train_03.npz": ("37cbba249fdc3659a6abea36b86eb401965002a6bdd7ec6854149d100d7baa86", 1465802),
    "rmd17_paracetamol_train_04.npz": ("84a22e4017c0a10de4547aa8221e9a8f95130e0d67a7fd8f7e423d67f2bf37e7", 1465802),
    "rmd17_paracetamol_train_05.npz": ("7c41c3b0296b401e8dbbc15f561824231b0970af694ded27b0787ceab91b6e38", 1465802),
    "rmd17_salicylic_test_01.npz": ("4a03f66c719d7684f39620b2bae6842613482a86cdd4e6f95115ae4d37f03cc0", 1177798),
    "rmd17_salicylic_test_02.npz": ("8dd9e9c587155142287a8ad55db5d250e822fd98585eaff73aae888bbc6ce2bb", 1177798),
    "rmd17_salicylic_test_03.npz": ("989b3fbe6210d3e001a3aaeec6da2a067d512313f24c3839de0b7186cc47d3b3", 1177798),
    "rmd17_salicylic_test_04.npz": ("1e28d7ee84d1400b2212965b186148fa2533dd3d4a18c21e8c9d118300358079", 1177798),
    "rmd17_salicylic_test_05.npz": ("11e3d4b6df87efe483595bd5ffad0e6b1aa51fe77a57b95dd4567072df15af50", 1177798),
    "rmd17_salicylic_train_01.npz": ("9f96d79ec7a66dec666dbba60307c083ede80ecc919e0c9513ad9accfe43b5c0", 1177798),
    "rmd17_salicylic_train_02.npz": ("b18d19aacc1f74b50ae12e78971ac13606aa12391dbf2ba87e670aa73dbdff00", 1177798),
    "rmd17_salicylic_train_03.npz": ("94f086f1ceb4d9f20ca8468ef28174550c3b5231bb6df1e9517055effb247dab", 1177798),
    "rmd17_salicylic_train_04.npz": ("3c07d0e713f0bb9d622949f2d7b21c24e300b9cf72cd824b5d9d9c05ce13b728", 1177798),
    "rmd17_salicylic_train_05.npz": ("aee6021b51a60f85a71831255a008b60538adc412fb2e0c33f2c6657964013f0", 1177798),
    "rmd17_toluene_test_01.npz": ("8a658b9bf1b7a5c1abaa03846ee6302725e02bdcd2ab720ef94da0be55625faa", 1105797),
    "rmd17_toluene_test_02.npz": ("8b04b4bbdba25f45478b3db153814b0332de8bcc7c3e56c1265696597c0191e2", 1105797),
    "rmd17_toluene_test_03.npz": ("a0729092008a3322043b902bebddc6ba8f5593dc983bb7e11a344d299cde195f", 1105797),
    "rmd17_toluene_test_04.npz": ("5f6a91c6d0e3cd144e4480f35a5856f2be4e2554dbc3f9fd15406cbcfaf6d936", 1105797),
    "rmd17_toluene_test_05.npz": ("9f3bb3ca88e2afc147a8a80eb78d2cf9689027f7661127669062a3bf582284a4", 1105797),
    "rmd17_toluene_train_01.npz": ("24d0642f897a1da1fdc4dbdd0a9c2a7f6082dd88e02954b12896a45a7a5fbac7", 1105797),
    "rmd17_toluene_train_02.npz": ("57a2f44a931d6074363ea7826e22b0cc06e52e1af1bace98daaec10ca3ce1bd6", 1105797),
    "rmd17_toluene_train_03.npz": ("b261bd56df9a237036a76526524d689892aadf84964cdb4357a42fb303b6aec2", 1105797),
    "rmd17_toluene_train_04.npz": ("82befdd811ed4e0578db83e73fc09751b43c69865a073a2b487120dbf411e203", 1105797),
    "rmd17_toluene_train_05.npz": ("2e374903c51d17f3444539e5e75e0bd7ebd208065c27836d6aa201af3587a48d", 1105797),
    "rmd17_uracil_test_01.npz": ("ceda757f7670d97080ec3c28dfb559aeb8ca54f49e7f0da0682fa1eb5ac00907", 889794),
    "rmd17_uracil_test_02.npz": ("8c789fd0085e8fda19a7a0d0482e6a2442b52a618c264ea1fdbeab90b08bb3a9", 889794),
    "rmd17_uracil_test_03.npz": ("312adc559d50e8e156cb8f859d0d0dc69e3c879d7e0a09ed77763f0e6443330c", 889794),
    "rmd17_uracil_test_04.npz": ("906548ac7b62eb6481485f12f47c04813f16ce9923abf4eb2fbde5b94dafadb9", 889794),
    "rmd17_uracil_test_05.npz": ("0ef14e77a1bf81fde96cfeea847ca2b1d0dc60710717bef10efff7a4c90adf2d", 889794),
    "rmd17_uracil_train_01.npz": ("e1d450430362e3bebdeea96b24501f5e56a5a8af1eb02d50cb763f48b51523cf", 889794),
    "rmd17_uracil_train_02.npz": ("2781e0bcd4143cac577bc5094e3ef2f77b04434601409d72af15b3903e044ff3", 889794),
    "rmd17_uracil_train_03.npz": ("bcaef0eb1ea6c4dbf3850806ef2a3ea3d468595b05a8fe67a58295b0a7951143", 889794),
    "rmd17_uracil_train_04.npz": ("edaecc4f9f9250b10aa7b805c3b349c6fc4f26825968a2011546e2a840b4f1fe", 889794),
    "rmd17_uracil_train_05.npz": ("d08ba73882849de5cbda50208365e8b2e57e5e83785334975af8d15fdc373f80", 889794),
    "LICENSE": ("a2010f343487d3f7618affe54f789f5487602331c0a8d03f49e9a7c547cf0499", 7048),
    "README.md": ("a3fdf624e26c54947887bae2302d6d81046d52be2dceffa0517a5b188b394a2d", 3485),
}


def _rmd17_npz_entry() -> DatasetEntry:
    files = []
    for name, (sha, size) in _RMD17_NPZ_FILES.items():
        if name.endswith(".npz"):
            url, molecule = f"{_RMD17_NPZ_RAW}/rmd17-npz/{name}", name[len("rmd17_"):].split("_")[0]
        else:
            url, molecule = f"{_RMD17_NPZ_RAW}/{name}", None
        files.append(RemoteFile(path=f"rmd17/{name}", url=url, sha256=sha, size=size, molecule=molecule))
    return DatasetEntry(
        name="rmd17",
        description="revised MD17 (PBE/def2-SVP), 5 pre-made train/test splits of 1000 frames "
                    "per molecule, npz, energies kcal/mol, forces kcal/mol/Å (~110 MB)",
        files=tuple(files), molecules=RMD17_MOLECULES,
        homepage="https://github.com/andersx/rmd17-npz",
        license="CC0-1.0",
        citation="A. S. Christensen and O. A. von Lilienfeld, 'On the role of gradients for machine "
                 "learning of molecular energies and forces', Mach. Learn.: Sci. Technol. 1, 045018 "
                 "(2020), arXiv:2007.09593",
    )


def _rmd17_figshare_entry() -> DatasetEntry:
    tarball = RemoteFile(
        path="rmd17.tar.bz2",
        url="https://figshare.com/ndownloader/files/23950376",
        sha256="cddeea2ec2c4b22a9de16a9a65a3eeedac5b29da9c99c20bbff0153912bf922b",
        size=1_066_301_513,
        md5="cb1a927628d96f2e966025da4fb63d18",
        mirrors=("https://archive.materialscloud.org/records/pfffs-fff86/files/rmd17.tar.bz2?download=1",),
        archive_members="rmd17/npz_data/rmd17_{molecule}.npz",
    )
    return DatasetEntry(
        name="rmd17-figshare",
        description="revised MD17 upstream tarball: 100k frames per molecule (npz_data/) and "
                    "5 train/test index files (splits/), ~1 GB",
        files=(tarball,), molecules=RMD17_MOLECULES,
        homepage="https://figshare.com/articles/dataset/Revised_MD17_dataset_rMD17_/12672038",
        license="CC0-1.0",
        citation=_rmd17_npz_entry().citation,
    )


def _md17_entry() -> DatasetEntry:
    base = "http://www.quantum-machine.org/gdml/data/npz"
    files = tuple(
        RemoteFile(path=f"md17/{md17_filename(m)}", url=f"{base}/{md17_filename(m)}", sha256=None, molecule=m)
        for m in MD17_MOLECULES)
    return DatasetEntry(
        name="md17",
        description="original MD17 (PBE+vdW-TS, FHI-aims) trajectories from sGDML, npz: R Å, z, "
                    "E kcal/mol, F kcal/mol/Å",
        files=files, molecules=MD17_MOLECULES,
        homepage="http://www.sgdml.org/#datasets",
        license=None,
        citation="S. Chmiela et al., 'Machine learning of accurate energy-conserving molecular force "
                 "fields', Sci. Adv. 3, e1603015 (2017)",
    )


def md17_filename(molecule: str) -> str:
    """Upstream file name of an original MD17 molecule (benzene is the 2017 version)."""
    return "md17_benzene2017.npz" if molecule == "benzene" else f"md17_{molecule}.npz"


#: All registered datasets, by name.
DATASETS: Dict[str, DatasetEntry] = {
    e.name: e for e in (_rmd17_npz_entry(), _rmd17_figshare_entry(), _md17_entry())
}


# ---------------------------------------------------------------------------- helpers
def sha256sum(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(name: str) -> DatasetEntry:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; registered: {', '.join(DATASETS)}") from None


def _canonical_molecules(entry: DatasetEntry, molecules: Optional[Iterable[str]]) -> Optional[List[str]]:
    if molecules is None:
        return None
    if isinstance(molecules, str):
        molecules = [molecules]
    out = []
    for m in molecules:
        key = molecule_key(m)
        if key not in entry.molecules:
            raise ValueError(f"dataset '{entry.name}' has no molecule '{m}'; valid: {', '.join(entry.molecules)}")
        out.append(key)
    return out


def files_for(name: str, molecules: Optional[Iterable[str]] = None) -> List[RemoteFile]:
    """Files of dataset ``name`` needed for ``molecules`` (all molecules if None)."""
    entry = _entry(name)
    wanted = _canonical_molecules(entry, molecules)
    return [f for f in entry.files if f.molecule is None or wanted is None or f.molecule in wanted]


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _recorded_sha256(dest: Path) -> Optional[str]:
    rec = _record_path(dest)
    if not rec.is_file():
        return None
    text = rec.read_text().split()
    return text[0].lower() if text else None


def _expected_sha256(remote: RemoteFile, dest: Path) -> Tuple[Optional[str], str]:
    """(checksum, origin) where origin is 'registry', 'recorded' or 'none'."""
    if remote.sha256:
        return remote.sha256.lower(), "registry"
    recorded = _recorded_sha256(dest)
    return (recorded, "recorded") if recorded else (None, "none")


# ---------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class FileStatus:
    """Result of checking one file. ``status`` is one of

    * ``"ok"``: matches the registry's SHA-256;
    * ``"recorded"``: no published checksum, matches the one recorded on first download;
    * ``"unverified"``: present, but no checksum is known at all;
    * ``"mismatch"``: present and different from the expected SHA-256;
    * ``"missing"``: not present.
    """
    dataset: str
    path: Path
    status: str
    expected: Optional[str] = None
    actual: Optional[str] = None

    @property
    def good(self) -> bool:
        return self.status in ("ok", "recorded")

    def __str__(self) -> str:
        s = f"{self.status:10s} {self.path}"
        if self.status == "mismatch":
            s += f" (expected {self.expected}, got {self.actual})"
        return s


def _check(dataset: str, remote: RemoteFile, data_dir: Path) -> FileStatus:
    dest = data_dir / remote.path
    if not dest.is_file():
        return FileStatus(dataset, dest, "missing", remote.sha256)
    expected, origin = _expected_sha256(remote, dest)
    actual = sha256sum(dest)
    if expected is None:
        return FileStatus(dataset, dest, "unverified", None, actual)
    if actual != expected:
        return FileStatus(dataset, dest, "mismatch", expected, actual)
    return FileStatus(dataset, dest, "ok" if origin == "registry" else "recorded", expected, actual)


def verify(data_dir: Optional[PathLike] = None, names: Optional[Sequence[str]] = None,
           molecules: Optional[Iterable[str]] = None, present_only: bool = False) -> List[FileStatus]:
    """Check files under ``data_dir`` against the registry's checksums.

    ``names`` selects datasets (default: all), ``molecules`` restricts molecule files.
    With ``present_only`` files that are not there are left out of the result.
    Returns one :class:`FileStatus` per file; use ``all(s.good for s in ...)`` for a verdict.
    """
    root = resolve_data_dir(data_dir)
    out = []
    for name in (names if names is not None else list(DATASETS)):
        for remote in files_for(name, molecules):
            st = _check(name, remote, root)
            if not (present_only and st.status == "missing"):
                out.append(st)
    return out


# ---------------------------------------------------------------------------- download
def _stream_to(url: str, tmp: Path, total: Optional[int], desc: str, progress: bool, timeout: float) -> str:
    """Streams ``url`` into ``tmp``, returns its SHA-256. Raises urllib/OS errors."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    h = hashlib.sha256()
    with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else total
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


class _ChecksumMismatch(Exception):
    pass


def _download_one(remote: RemoteFile, dest: Path, progress: bool, timeout: float) -> None:
    expected, origin = _expected_sha256(remote, dest)
    failures, checksum_failed, unreachable = [], False, False
    for url in remote.urls:
        got: List[str] = []

        def fetch(tmp: Path) -> None:     # nothing reaches ``dest`` unless its checksum is right
            actual = _stream_to(url, tmp, remote.size, dest.name, progress, timeout)
            if expected is not None and actual != expected:
                raise _ChecksumMismatch(f"{url}: SHA-256 {actual} differs from the {origin} {expected}")
            got.append(actual)
        try:
            atomic_write(dest, fetch)
            if expected is None:
                _record_path(dest).write_text(f"{got[0]}  {dest.name}\n")
                print(f"oreo: {dest.name} has no published checksum; its SHA-256 is {got[0]} "
                      f"(recorded in {_record_path(dest)})", file=sys.stderr)
            return
        except _ChecksumMismatch as exc:
            failures.append(str(exc))
            checksum_failed = True
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {type(exc).__name__}: {reason}")
            unreachable = True
    lines = [f"could not download {remote.path}:"] + [f"  {f}" for f in failures]
    if checksum_failed:
        lines.append("the server delivered different bytes than expected; nothing was written.")
        raise ChecksumError("\n".join(lines))
    if unreachable:
        lines.append("are you offline or behind a proxy? (urllib honours https_proxy/http_proxy)")
    lines.append(f"you can also fetch {remote.url} on another machine and copy it to {dest}"
                 + (f" (SHA-256 {expected})" if expected else ""))
    raise DownloadError("\n".join(lines))


def _extract(remote: RemoteFile, archive: Path, data_dir: Path, molecules: Optional[List[str]],
             all_molecules: Sequence[str]) -> List[Path]:
    """Extracts a tarball into ``data_dir`` (skipping molecule files not asked for).

    Members go to a temporary folder inside ``data_dir`` first and are then renamed into place,
    so a failed extraction leaves no half-written files under their final names.
    """
    pattern = remote.archive_members
    skip = set()
    if molecules is not None:
        skip = {pattern.format(molecule=m) for m in all_molecules if m not in molecules}
    staging = Path(tempfile.mkdtemp(prefix=".oreo-extract-", dir=data_dir))
    placed = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            def members():
                for m in tar:
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    if name in skip or not (m.isfile() or m.isdir()):
                        continue
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise DownloadError(f"refusing unsafe archive member '{m.name}' in {archive}")
                    yield m
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members(), **safe)
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = data_dir / src.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
            placed.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"could not extract {archive}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def fetch(remote: RemoteFile, data_dir: Optional[PathLike] = None, progress: bool = True,
          force: bool = False, timeout: float = 60.0) -> Path:
    """Ensures one registry file is present and verified under ``data_dir``; returns its path.

    An existing file that matches its checksum is kept (unless ``force``); one that does not
    is downloaded again. Archives are not extracted here (see :func:`download`).
    """
    root = resolve_data_dir(data_dir)
    dest = root / remote.path
    if dest.is_file() and not force:
        expected, _ = _expected_sha256(remote, dest)
        if expected is None or sha256sum(dest) == expected:
            return dest
        print(f"oreo: {dest} does not match its SHA-256; downloading it again", file=sys.stderr)
    _download_one(remote, dest, progress, timeout)
    return dest


def download(name: str, data_dir: Optional[PathLike] = None, molecules: Optional[Iterable[str]] = None,
             progress: bool = True, force: bool = False, timeout: float = 60.0,
             keep_archive: bool = True) -> List[Path]:
    """Downloads dataset ``name`` (see :data:`DATASETS`) into ``data_dir``.

    ``molecules`` restricts molecule files (for tarballs: which molecule files are extracted).
    Files already present and verified are skipped unless ``force``. Each file is streamed
    to a temporary file, checked against its SHA-256 and atomically renamed into place;
    tarballs are then extracted into ``data_dir``. ``keep_archive=False`` deletes a tarball
    after a successful extraction.

    Returns the paths of the dataset's files (for tarballs: the extracted files).
    Raises :class:`DownloadError` when offline or a server fails, :class:`ChecksumError` when
    the bytes differ from the registry, ``ValueError`` for an unknown dataset or molecule.
    """
    entry = _entry(name)
    root = resolve_data_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    wanted = _canonical_molecules(entry, molecules)
    paths: List[Path] = []
    for remote in files_for(name, wanted):
        if remote.is_archive:
            targets = [root / remote.archive_members.format(molecule=m) for m in (wanted or entry.molecules)]
            if all(t.is_file() for t in targets) and not force:
                paths += targets
                continue
            archive = fetch(remote, root, progress=progress, force=force, timeout=timeout)
            paths += _extract(remote, archive, root, wanted, entry.molecules)
            if not keep_archive:
                archive.unlink()
        else:
            paths.append(fetch(remote, root, progress=progress, force=force, timeout=timeout))
    return paths
